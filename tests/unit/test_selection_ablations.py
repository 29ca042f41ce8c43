"""CPPO's own ablations of the token selection (issue 31), against values derived by hand.

``ranking="entropy"`` and ``ranking="random"`` keep the entropy-shift rule's budget of tokens per
response (docs/method.md §2) and change only which tokens fill it (:mod:`cppo_lightning.rankings`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cppo_lightning.callbacks import PerceptionTokens
from cppo_lightning.callbacks.monitor import baseline_counts
from cppo_lightning.detection import RANKINGS, TokenSelector, perception_token_mask
from cppo_lightning.rankings import highest_entropy_mask, random_token_mask


def rows(*values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# Three responses of 6 positions (float64, so every difference below is the decimal one).
#
# Row 0: H  = [2.0, 0.5, 1.0, 3.0, 0.2, 9.0], H- = [2.5, 2.5, 2.5, 2.0, 0.4, 9.9], position 5 is
#   padding. dH = [0.5, 2.0, 1.5, -1.0, 0.2, (0.9)]: the candidates (valid, dH > 0) are 0, 1, 2
#   and 4, n = 4, k = max(1, floor(0.5 * 4)) = 2. Raw scores 0.5, 2.0, 1.5, 0.2 -> the shift
#   keeps {1, 2}: budget 2. By H among the valid positions 0-4, [2.0, 0.5, 1.0, 3.0, 0.2], the
#   two highest are 3 (3.0; its entropy *falls* under I-) and 0 (2.0) -> {0, 3}; the padding's
#   9.0 is never taken. The two rankings share no token.
# Row 1: H- = H - 0.25 everywhere: no candidate, n = 0, so the shift keeps nothing, budget 0,
#   and neither ablation keeps anything however high H is.
# Row 2: H  = [1.0, 1.0, 0.5, 0.25, 0.125, 0.125], H- = [1.5, 1.125, 1.0, 0.375, 0.25, 0.375]
#   (dyadic, so exact). dH = [0.5, 0.125, 0.5, 0.125, 0.125, 0.25], all > 0: n = 6,
#   k = floor(0.5 * 6) = 3; the 3rd largest raw score is 0.25 -> the shift keeps {0, 2, 5}:
#   budget 3. By H: 1.0, 1.0, 0.5 -> {0, 1, 2}.
H = torch.tensor(
    [
        [2.0, 0.5, 1.0, 3.0, 0.2, 9.0],
        [3.0, 2.0, 1.0, 0.5, 0.4, 0.3],
        [1.0, 1.0, 0.5, 0.25, 0.125, 0.125],
    ],
    dtype=torch.float64,
)
H_NEG = torch.stack(
    [
        torch.tensor([2.5, 2.5, 2.5, 2.0, 0.4, 9.9], dtype=torch.float64),
        H[1] - 0.25,
        torch.tensor([1.5, 1.125, 1.0, 0.375, 0.25, 0.375], dtype=torch.float64),
    ]
)
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
SHIFT = rows([0, 1, 1, 0, 0, 0], [0] * 6, [1, 0, 1, 0, 0, 1])
BY_ENTROPY = rows([1, 0, 0, 1, 0, 0], [0] * 6, [1, 1, 1, 0, 0, 0])


def select(ranking: str, **options) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return perception_token_mask(H, H_NEG, MASK, score="raw", ranking=ranking, **options)


def test_entropy_shift_is_the_default_and_matches_the_hand_derivation():
    assert torch.equal(select("entropy-shift"), SHIFT)
    assert torch.equal(perception_token_mask(H, H_NEG, MASK, score="raw"), SHIFT)
    assert TokenSelector().ranking == "entropy-shift"
    assert PerceptionTokens().selector.ranking == "entropy-shift"


def test_entropy_ranking_picks_the_hand_computed_tokens():
    assert torch.equal(select("entropy"), BY_ENTROPY)
    # Through the selector (no gate) and the callback that builds it for a run.
    selector = TokenSelector(score="raw", gate_advantages=False, ranking="entropy")
    assert torch.equal(selector(H, H_NEG, MASK), BY_ENTROPY)
    callback = PerceptionTokens(top_fraction=0.5, score="raw", ranking="entropy")
    assert callback.selector == TokenSelector(score="raw", ranking="entropy")


def test_entropy_ranking_follows_the_shift_rules_budget_options():
    # top_k = 1: the shift keeps one token per row with a candidate (row 0: 1 with dH = 2.0;
    # row 2: 0 and 2 tie at 0.5, both kept -> budget 2). By H: row 0 -> 3 (3.0); row 2 -> 0 and
    # 1 (both 1.0).
    assert torch.equal(
        select("entropy-shift", top_k=1), rows([0, 1, 0, 0, 0, 0], [0] * 6, [1, 0, 1, 0, 0, 0])
    )
    assert torch.equal(
        select("entropy", top_k=1), rows([0, 0, 0, 1, 0, 0], [0] * 6, [1, 1, 0, 0, 0, 0])
    )
    # top_fraction = 0.25: row 0 floor(1.0) = 1 -> H picks 3; row 2 floor(1.5) = 1 -> the shift
    # keeps 0 and 2 (tied at 0.5), budget 2 -> H picks 0 and 1.
    assert torch.equal(
        select("entropy", top_fraction=0.25), rows([0, 0, 0, 1, 0, 0], [0] * 6, [1, 1, 0, 0, 0, 0])
    )


def test_highest_entropy_mask_keeps_ties_and_never_padding_or_nan():
    # Row 0: budget 1, H = [0.5, 0.7, 0.7, 0.1]: the two 0.7 tie at the threshold, both kept.
    # Row 1: the highest H sits on padding (position 0) and a NaN (position 3): budget 2 takes
    #   the two highest of the valid, finite rest, positions 1 (0.4) and 2 (0.3).
    # Row 2: budget 5 > 2 valid tokens: both kept.
    entropy = torch.tensor(
        [[0.5, 0.7, 0.7, 0.1], [9.0, 0.4, 0.3, float("nan")], [0.2, 0.1, 5.0, 5.0]]
    )
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    out = highest_entropy_mask(entropy, mask, torch.tensor([1, 2, 5]))
    assert torch.equal(out, rows([0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]))
    assert not highest_entropy_mask(entropy, mask, torch.zeros(3, dtype=torch.long)).any()


def test_gating_applies_to_every_ranking():
    advantages = torch.tensor([-1.0, 2.0, 0.5])  # row 0 negative: its tokens go
    for ranking in RANKINGS:
        torch.manual_seed(0)
        ungated = select(ranking)
        torch.manual_seed(0)
        gated = select(ranking, advantages=advantages)
        assert not gated[0].any() and ungated[0].any(), ranking
        assert torch.equal(gated[1:], ungated[1:]), ranking
    torch.manual_seed(0)
    selector = TokenSelector(score="raw", ranking="entropy")
    assert torch.equal(selector(H, H_NEG, MASK, advantages), BY_ENTROPY & (advantages > 0)[:, None])


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantised entropies (ties and zero shifts common), ragged padding, mixed advantages."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, 5, (8, 11), generator=gen).float() / 2
    h_neg = torch.randint(0, 5, (8, 11), generator=gen).float() / 2
    lengths = torch.randint(0, 12, (8,), generator=gen)
    mask = (torch.arange(11)[None] < lengths[:, None]).long()
    advantages = torch.randn(8, generator=gen)
    return h, h_neg, mask, advantages


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_fraction", [0.1, 0.5, 1.0])
def test_random_picks_the_shift_rules_count_per_response_never_padding(seed, top_fraction):
    h, h_neg, mask, _ = _random_case(seed)
    shift = perception_token_mask(h, h_neg, mask, top_fraction=top_fraction, score="raw")
    torch.manual_seed(seed)
    out = perception_token_mask(
        h, h_neg, mask, top_fraction=top_fraction, score="raw", ranking="random"
    )
    assert out.dtype == torch.bool
    assert torch.equal(out.sum(1), shift.sum(1))  # the shift rule's count, ties included
    assert not (out & ~mask.bool()).any(), "padding selected"


@pytest.mark.parametrize("seed", range(5))
def test_random_with_the_gate_selects_in_positive_rows_only(seed):
    h, h_neg, mask, advantages = _random_case(seed)
    selector = TokenSelector(top_fraction=0.5, ranking="random")
    out = selector(h, h_neg, mask, advantages)
    budget = perception_token_mask(h, h_neg, mask, top_fraction=0.5).sum(1)
    positive = advantages > 0
    assert not out[~positive].any()
    assert torch.equal(out[positive].sum(1), budget[positive])


def test_random_is_uniform_over_the_valid_tokens():
    # 6000 copies of one response with 4 valid tokens and a budget of 2: each of the C(4, 2) = 6
    # pairs should appear 1000 times (binomial sd ~ 29), each token half the time (sd ~ 39).
    mask = torch.tensor([[1, 0, 1, 1, 0, 1]]).expand(6000, 6)
    out = random_token_mask(
        mask, torch.full((6000,), 2), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.sum(1), torch.full((6000,), 2))
    assert not out[:, [1, 4]].any()
    per_token = out[:, [0, 2, 3, 5]].sum(0).float()
    assert ((per_token - 3000).abs() < 200).all(), per_token
    pairs = {pair: 0 for pair in itertools.combinations((0, 2, 3, 5), 2)}
    for row in out.nonzero()[:, 1].view(-1, 2).tolist():
        pairs[tuple(row)] += 1
    assert all(abs(count - 1000) < 150 for count in pairs.values()), pairs


def test_random_draws_from_torchs_global_generator_and_repeats_from_its_state():
    h, h_neg, mask, _ = _random_case(0)
    options = {"top_fraction": 1.0, "ranking": "random"}
    torch.manual_seed(7)
    first = perception_token_mask(h, h_neg, mask, **options)
    # The global CPU generator seeded with 7 is what a Generator seeded with 7 draws.
    seeded = perception_token_mask(
        h, h_neg, mask, generator=torch.Generator().manual_seed(7), **options
    )
    assert torch.equal(first, seeded)
    # Restoring the global state (what a checkpoint's resume does) repeats the draw exactly.
    state = torch.get_rng_state()
    again = perception_token_mask(h, h_neg, mask, **options)
    torch.set_rng_state(state)
    assert torch.equal(perception_token_mask(h, h_neg, mask, **options), again)
    # Another seed draws other tokens (same counts).
    torch.manual_seed(8)
    other = perception_token_mask(h, h_neg, mask, **options)
    assert not torch.equal(other, first) and torch.equal(other.sum(1), first.sum(1))


def test_a_given_generator_leaves_the_global_one_alone_and_other_rankings_draw_nothing():
    h, h_neg, mask, _ = _random_case(1)
    state = torch.get_rng_state()
    perception_token_mask(h, h_neg, mask, ranking="random", generator=torch.Generator())
    perception_token_mask(h, h_neg, mask, ranking="entropy")
    perception_token_mask(h, h_neg, mask)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_monitors_rho_baselines_stay_entropy_shift_and_draw_nothing():
    # Under the random ablation, detection at other budgets is still the paper's rule: the same
    # counts as with an entropy-shift selector, and the run's generator does not move.
    labels = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    pool = torch.ones(2, 4, dtype=torch.bool)
    selected = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    entropy = torch.tensor([[0.1, 2.0, 0.2, 0.3], [0.5, 0.4, 0.3, 0.2]])
    removed = entropy + torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0]])
    expected = baseline_counts(selected, labels, pool, entropy, removed, TokenSelector())
    state = torch.get_rng_state()
    for ranking in ("random", "entropy"):
        got = baseline_counts(
            selected, labels, pool, entropy, removed, TokenSelector(ranking=ranking)
        )
        assert {k: v.tolist() for k, v in got.items()} == {
            k: v.tolist() for k, v in expected.items()
        }
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("ranking", ["shift", "Entropy", "uniform", ""])
def test_a_bad_ranking_name_says_which_exist(ranking):
    message = r"ranking must be one of \('entropy-shift', 'entropy', 'random'\)"
    with pytest.raises(ValueError, match=message):
        TokenSelector(ranking=ranking)
    with pytest.raises(ValueError, match=message):
        perception_token_mask(H, H_NEG, MASK, ranking=ranking)
    with pytest.raises(ValueError, match=message):
        PerceptionTokens(ranking=ranking)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (torch.tensor([1, 2]), r"budget must be \[N\]"),
        (torch.tensor([1.0, 2.0, 0.0]), "budget must hold integer token counts"),
        (torch.tensor([1, -1, 0]), "budget must be >= 0"),
    ],
)
def test_budget_errors(budget, match):
    with pytest.raises(ValueError, match=match):
        highest_entropy_mask(H, MASK, budget)
    with pytest.raises(ValueError, match=match):
        random_token_mask(MASK, budget)


def test_highest_entropy_mask_shape_error():
    with pytest.raises(ValueError, match="entropy and mask must both be"):
        highest_entropy_mask(H[:, :3], MASK, torch.tensor([1, 1, 1]))
