"""Unit tests for cppo_lightning.detection against numbers derived by hand
(docs/method.md §2, §7)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cppo_lightning.detection import (
    TokenSelector,
    entropy_shift_score,
    perception_token_mask,
    token_entropy,
)

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def rows(*values: list[bool]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# token_entropy
# --------------------------------------------------------------------------------------------


def test_token_entropy_by_hand():
    # Position 0: uniform over V = 4 -> H = ln 4.
    # Position 1: logits [ln 2, 0] padded with -inf -> p = [2/3, 1/3, 0, 0],
    #   H = -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - (2/3) ln 2 = 0.636514; the -inf entries add 0.
    # Position 2: one-hot-ish [100, 0, 0, 0] -> H = 3 e^-100 (100 + ...) ~ 1e-41 -> 0.
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [LN2, 0.0, -math.inf, -math.inf],
                [100.0, 0.0, 0.0, 0.0],
            ]
        ]
    )
    out = token_entropy(logits)
    assert out.shape == (1, 3)
    close(out, [[math.log(4.0), math.log(3.0) - 2.0 / 3.0 * LN2, 0.0]], atol=1e-6)


def test_token_entropy_temperature():
    # logits [ln 2, 0] at T = 2 -> [ln 2 / 2, 0] -> p = [sqrt2, 1] / (1 + sqrt2)
    #   = [0.585786, 0.414214]; H = ln(1 + sqrt2) - 0.585786 * (ln 2) / 2 = 0.678355.
    # At T = 1 it is 0.636514 (above); a higher temperature flattens the distribution.
    logits = torch.tensor([[[LN2, 0.0]]])
    close(token_entropy(logits, temperature=2.0), [[0.678355]], atol=1e-6)
    close(token_entropy(logits, temperature=1.0), [[0.636514]], atol=1e-6)
    # Very high temperature -> uniform -> ln V.
    close(token_entropy(torch.randn(1, 1, 5), temperature=1e6), [[math.log(5.0)]], atol=1e-5)


def test_token_entropy_chunked_matches_unchunked_and_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 4.0
    logits[0, 1, :4] = -math.inf  # masked vocabulary entries
    whole = token_entropy(logits, temperature=0.7)
    for chunk_size in (1, 4, 7, 10, 15, 4096):  # pieces of a response, 1, 2, 3 responses
        torch.testing.assert_close(token_entropy(logits, 0.7, chunk_size=chunk_size), whole)
    ref_logp = torch.log_softmax(logits.double() / 0.7, dim=-1)
    ref = -(ref_logp.exp() * ref_logp.nan_to_num(neginf=0.0)).sum(-1)
    close(whole.double(), ref, atol=1e-5)
    assert whole.dtype == torch.float32


def test_token_entropy_non_contiguous_slice():
    # The logits of the response tokens are usually a slice of the model output.
    full = torch.randn(3, 9, 6)
    logits = full[:, 2:-1]  # [3, 6, 6], not contiguous
    assert not logits.is_contiguous()
    expected = token_entropy(logits.contiguous())
    for chunk_size in (1, 4, 6, 13):
        torch.testing.assert_close(token_entropy(logits, chunk_size=chunk_size), expected)


def test_token_entropy_dtypes_and_empty():
    logits = torch.randn(2, 3, 5)
    # bf16 logits are upcast: the entropy comes back in float32.
    assert token_entropy(logits.bfloat16()).dtype == torch.float32
    assert token_entropy(logits.double()).dtype == torch.float64
    assert token_entropy(torch.zeros(0, 3, 5)).shape == (0, 3)
    assert token_entropy(torch.zeros(2, 0, 5)).shape == (2, 0)


def test_token_entropy_is_differentiable_and_finite_with_masked_vocab():
    logits = torch.tensor([[[0.0, 1.0, -math.inf], [2.0, -math.inf, -math.inf]]])
    logits.requires_grad_()
    out = token_entropy(logits, chunk_size=1)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # -inf entries get exactly zero gradient; a single surviving entry gives H = 0, grad 0.
    assert logits.grad[0, 0, 2] == 0 and (logits.grad[0, 1] == 0).all()
    assert logits.grad[0, 0, :2].abs().sum() > 0
    with torch.no_grad():
        assert not token_entropy(logits).requires_grad


def test_token_entropy_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: token_entropy(x, temperature=1.3, chunk_size=2), (logits,)
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(3, 4),), {}, r"must be \[N, L, V\]"),
        ((torch.zeros(1, 3, 4),), {"temperature": 0.0}, "temperature must be a finite number"),
        ((torch.zeros(1, 3, 4),), {"temperature": math.inf}, "temperature must be a finite"),
        ((torch.zeros(1, 3, 4),), {"chunk_size": 0}, "chunk_size must be an int >= 1"),
    ],
)
def test_token_entropy_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_entropy(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# entropy_shift_score
# --------------------------------------------------------------------------------------------


def test_entropy_shift_score_by_hand():
    # dH = H- - H = [1, -1, 3]; normalised = relu(dH) / (H- + 1e-6) = [1/2, 0, 3/4].
    h = torch.tensor([[1.0, 2.0, 1.0]])
    h_neg = torch.tensor([[2.0, 1.0, 4.0]])
    close(entropy_shift_score(h, h_neg), [[1 / (2 + 1e-6), 0.0, 3 / (4 + 1e-6)]])
    close(entropy_shift_score(h, h_neg, score="raw"), [[1.0, -1.0, 3.0]])
    with pytest.raises(ValueError, match="score must be one of"):
        entropy_shift_score(h, h_neg, score="relative")
    with pytest.raises(ValueError, match="same shape"):
        entropy_shift_score(h, h_neg[:, :2])


# --------------------------------------------------------------------------------------------
# perception_token_mask
# --------------------------------------------------------------------------------------------


def test_top_fraction_floors():
    # H = 1 everywhere, H- = [2, 3, 1.5, 5, 4] -> dH = [1, 2, 0.5, 4, 3] (all > 0, n = 5),
    # scores dH / H- = [0.5, 0.667, 0.333, 0.8, 0.75]. k = max(1, floor(0.5 * 5)) = 2
    # -> keep 0.8 (index 3) and 0.75 (index 4).
    h = torch.ones(1, 5)
    h_neg = torch.tensor([[2.0, 3.0, 1.5, 5.0, 4.0]])
    out = perception_token_mask(h, h_neg, torch.ones(1, 5))
    assert torch.equal(out, rows([False, False, False, True, True]))


def test_at_least_one_token_when_any_shift_is_positive():
    # Only index 1 has dH > 0 (n = 1): floor(0.5 * 1) = 0 -> max(1, 0) = 1 -> index 1.
    h = torch.ones(1, 3)
    h_neg = torch.tensor([[0.5, 2.0, 1.0]])
    out = perception_token_mask(h, h_neg, torch.ones(1, 3))
    assert torch.equal(out, rows([False, True, False]))


def test_ties_at_the_threshold_are_kept():
    # H- = 10, H = [1, 5, 5, 9] -> dH = [9, 5, 5, 1], scores ~ [0.9, 0.5, 0.5, 0.1] (the two 0.5
    # are bit-identical). n = 4, k = 2: threshold = 2nd largest = 0.5 -> three tokens kept.
    h = torch.tensor([[1.0, 5.0, 5.0, 9.0]])
    h_neg = torch.full((1, 4), 10.0)
    out = perception_token_mask(h, h_neg, torch.ones(1, 4))
    assert torch.equal(out, rows([True, True, True, False]))


def test_non_positive_shift_never_selected():
    # dH = [0, -0.5, 1, 2]: only indices 2 and 3 are candidates, even with top_fraction = 1.
    h = torch.ones(1, 4)
    h_neg = torch.tensor([[1.0, 0.5, 2.0, 3.0]])
    for score in ("normalized", "raw"):
        out = perception_token_mask(h, h_neg, torch.ones(1, 4), top_fraction=1.0, score=score)
        assert torch.equal(out, rows([False, False, True, True]))


def test_padding_and_prompt_positions_never_selected():
    # The largest shifts sit at masked positions: prompt (leading 0s) and padding (trailing 0s).
    h = torch.zeros(1, 6)
    h_neg = torch.tensor([[50.0, 40.0, 1.0, 2.0, 3.0, 60.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    out = perception_token_mask(h, h_neg, mask, top_fraction=1.0, score="raw")
    assert torch.equal(out, rows([False, False, True, True, True, False]))
    # Bool and float masks behave the same.
    assert torch.equal(out, perception_token_mask(h, h_neg, mask.bool(), top_fraction=1.0))


def test_advantage_gating_keeps_only_positive_rows():
    h = torch.ones(3, 4)
    h_neg = torch.tensor([[2.0, 3.0, 4.0, 5.0]]).expand(3, 4)
    mask = torch.ones(3, 4)
    adv = torch.tensor([1.0, 0.0, -1.0])
    ungated = perception_token_mask(h, h_neg, mask)
    assert ungated.sum(dim=1).tolist() == [2, 2, 2]
    out = perception_token_mask(h, h_neg, mask, advantages=adv)
    assert torch.equal(out[0], ungated[0])
    assert not out[1:].any()  # A = 0 and A < 0 rows are empty
    # The same advantages broadcast per token gate identically.
    out_tok = perception_token_mask(h, h_neg, mask, advantages=adv[:, None].expand(3, 4))
    assert torch.equal(out_tok, out)


def test_identical_views_select_nothing():
    gen = torch.Generator().manual_seed(2)
    h = torch.rand(4, 7, generator=gen) * 3
    out = perception_token_mask(h, h.clone(), torch.ones(4, 7), advantages=torch.ones(4))
    assert out.dtype == torch.bool and not out.any()


def test_top_k_is_absolute_and_overrides_top_fraction():
    # Scores as in test_top_fraction_floors: [0.5, 0.667, 0.333, 0.8, 0.75].
    h = torch.ones(1, 5)
    h_neg = torch.tensor([[2.0, 3.0, 1.5, 5.0, 4.0]])
    mask = torch.ones(1, 5)
    out = perception_token_mask(h, h_neg, mask, top_k=3, top_fraction=0.2)
    assert torch.equal(out, rows([False, True, False, True, True]))
    # k = min(top_k, n): asking for more than there are keeps every candidate.
    assert perception_token_mask(h, h_neg, mask, top_k=10).all()


def test_raw_score_changes_the_winner():
    # Token a: H = 0.1, H- = 0.5 -> dH = 0.4, normalised 0.8.
    # Token b: H = 3.0, H- = 4.0 -> dH = 1.0, normalised 0.25.
    # top_k = 1: the normalised score picks a, the raw shift picks b.
    h = torch.tensor([[0.1, 3.0]])
    h_neg = torch.tensor([[0.5, 4.0]])
    mask = torch.ones(1, 2)
    assert torch.equal(perception_token_mask(h, h_neg, mask, top_k=1), rows([True, False]))
    assert torch.equal(
        perception_token_mask(h, h_neg, mask, top_k=1, score="raw"), rows([False, True])
    )


def test_rows_are_independent():
    # Row 0 has much larger shifts than row 1; per response each keeps its own top half.
    # A batch-level threshold would leave row 1 empty.
    h = torch.ones(2, 4)
    h_neg = torch.tensor([[5.0, 6.0, 7.0, 8.0], [1.1, 1.2, 1.3, 1.4]])
    out = perception_token_mask(h, h_neg, torch.ones(2, 4))
    assert torch.equal(out, rows([False, False, True, True], [False, False, True, True]))
    # Masking another row out entirely does not change a row's selection.
    out1 = perception_token_mask(h, h_neg, torch.tensor([[0.0] * 4, [1.0] * 4]))
    assert torch.equal(out1[1], out[1]) and not out1[0].any()


def test_floor_is_robust_to_round_off():
    # 0.29 * 100 = 28.999999999999996 in binary floating point; floor must still give 29.
    h = torch.zeros(1, 100)
    h_neg = torch.arange(1, 101, dtype=torch.float32)[None]
    out = perception_token_mask(h, h_neg, torch.ones(1, 100), top_fraction=0.29, score="raw")
    assert out.sum().item() == 29
    assert out[0, -29:].all()


def test_output_is_bool_without_grad():
    h = torch.rand(2, 3, requires_grad=True)
    h_neg = (h.detach() + torch.rand(2, 3)).requires_grad_()
    out = perception_token_mask(h, h_neg, torch.ones(2, 3))
    assert out.dtype == torch.bool
    assert not out.requires_grad


def _reference_mask(h, h_neg, mask, top_fraction, top_k, score, adv):
    """Row-by-row transcription of the rule of docs/method.md §2, for comparison."""
    out = torch.zeros_like(h, dtype=torch.bool)
    scores = entropy_shift_score(h, h_neg, score=score)
    for i in range(h.shape[0]):
        cand = [j for j in range(h.shape[1]) if mask[i, j] != 0 and h_neg[i, j] - h[i, j] > 0]
        n = len(cand)
        if n == 0 or (adv is not None and adv[i] <= 0):
            continue
        k = min(top_k, n) if top_k is not None else max(1, math.floor(top_fraction * n))
        kth = sorted((scores[i, j].item() for j in cand), reverse=True)[k - 1]
        for j in cand:
            out[i, j] = scores[i, j].item() >= kth
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_row_by_row_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n, length = 5, 9
    # Quantised entropies make ties and zero shifts common.
    h = torch.randint(0, 5, (n, length), generator=gen).float() / 2
    h_neg = torch.randint(0, 5, (n, length), generator=gen).float() / 2
    mask = (torch.rand(n, length, generator=gen) > 0.3).float()
    adv = torch.randn(n, generator=gen)
    for top_fraction, top_k, score, a in [
        (0.5, None, "normalized", None),
        (0.3, None, "raw", adv),
        (1.0, None, "normalized", adv),
        (0.5, 2, "raw", None),
    ]:
        out = perception_token_mask(
            h, h_neg, mask, top_fraction=top_fraction, top_k=top_k, score=score, advantages=a
        )
        ref = _reference_mask(h, h_neg, mask, top_fraction, top_k, score, a)
        assert torch.equal(out, ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"entropy_removed": torch.ones(2, 4)}, "same shape"),
        ({"mask": torch.ones(2, 4)}, r"mask must be \[N, L\]"),
        ({"top_fraction": 0.0}, r"top_fraction must be in \(0, 1\]"),
        ({"top_fraction": 1.5}, r"top_fraction must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
        ({"top_k": True}, "top_k must be an int >= 1"),
        ({"score": "abs"}, "score must be one of"),
        ({"advantages": torch.ones(3)}, r"advantages must be \[N\]"),
    ],
)
def test_perception_token_mask_errors(kwargs, match):
    inputs = {"entropy": torch.ones(2, 3), "entropy_removed": torch.ones(2, 3)}
    inputs["mask"] = torch.ones(2, 3)
    options = {}
    for key, value in kwargs.items():
        (inputs if key in inputs else options)[key] = value
    with pytest.raises(ValueError, match=match):
        perception_token_mask(
            inputs["entropy"], inputs["entropy_removed"], inputs["mask"], **options
        )


# --------------------------------------------------------------------------------------------
# TokenSelector
# --------------------------------------------------------------------------------------------


def test_token_selector_gates_only_when_asked():
    h = torch.ones(2, 4)
    h_neg = torch.tensor([[2.0, 3.0, 4.0, 5.0]]).expand(2, 4)
    mask = torch.ones(2, 4)
    adv = torch.tensor([1.0, -1.0])
    gated = TokenSelector()(h, h_neg, mask, adv)
    assert torch.equal(gated, perception_token_mask(h, h_neg, mask, advantages=adv))
    assert gated[0].any() and not gated[1].any()
    ungated = TokenSelector(gate_advantages=False)(h, h_neg, mask, adv)
    assert torch.equal(ungated, perception_token_mask(h, h_neg, mask))
    assert ungated[1].any()
    # Options are forwarded.
    top1 = TokenSelector(top_k=1, score="raw", gate_advantages=False)(h, h_neg, mask)
    assert top1.sum(dim=1).tolist() == [1, 1] and top1[:, 3].all()


def test_token_selector_needs_advantages_when_gating():
    with pytest.raises(ValueError, match="needs advantages"):
        TokenSelector()(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_fraction": 0.0}, r"top_fraction must be in \(0, 1\]"),
        ({"top_fraction": 2.0}, r"top_fraction must be in \(0, 1\]"),
        ({"score": "delta"}, "score must be one of"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
        ({"top_k": 2.5}, "top_k must be an int >= 1"),
        ({"gate_advantages": 1}, "gate_advantages must be True or False"),
    ],
)
def test_token_selector_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenSelector(**kwargs)


def test_token_selector_is_frozen():
    selector = TokenSelector()
    with pytest.raises(dataclasses.FrozenInstanceError):
        selector.top_fraction = 0.3  # type: ignore[misc]
