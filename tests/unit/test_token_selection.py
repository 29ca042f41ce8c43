"""Unit tests for top-fraction token selection and the high-entropy mask (arXiv 2506.01939)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses.token_selection import (
    selection_stats,
    selection_threshold,
    top_entropy_mask,
    top_fraction_mask,
)

# Two responses; (0, 3) is padding with the largest "entropy" of all, which must never be kept.
ENTROPY = torch.tensor([[0.5, 2.0, 1.0, 9.9], [3.0, 0.1, 2.0, 0.7]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def positions(selected: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in selected.nonzero().tolist()]


def test_count_rule_by_hand():
    # n = 7 valid tokens; rho = 0.2 -> k = ceil(1.4) = 2. Highest: 3.0 at (1, 0), then a tie of
    # 2.0 at (0, 1) and (1, 2): the earlier position (0, 1) wins. Padding (9.9) never kept.
    selected = top_entropy_mask(ENTROPY, MASK, 0.2)
    assert selected.dtype == torch.bool
    assert positions(selected) == [(0, 1), (1, 0)]
    # rho = 0.5 -> k = ceil(3.5) = 4: 3.0, 2.0, 2.0, 1.0.
    assert positions(top_entropy_mask(ENTROPY, MASK, 0.5)) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    # rho = 0 keeps the single highest; rho = 1 every valid token.
    assert positions(top_entropy_mask(ENTROPY, MASK, 0.0)) == [(1, 0)]
    assert top_entropy_mask(ENTROPY, MASK, 1.0).tolist() == MASK.bool().tolist()


def test_quantile_rule_by_hand():
    # Valid entropies sorted: [0.1, 0.5, 0.7, 1.0, 2.0, 2.0, 3.0]. rho = 0.2 -> the 0.8 quantile:
    # position 0.8 * 6 = 4.8 between 2.0 and 2.0 -> threshold 2.0; >= keeps both tied 2.0s,
    # so three tokens (TRL's rule keeps ties).
    selected = top_entropy_mask(ENTROPY, MASK, 0.2, rule="quantile")
    assert positions(selected) == [(0, 1), (1, 0), (1, 2)]
    # rho = 0.5 -> the median, position 3 -> 1.0 -> four tokens.
    selected = top_entropy_mask(ENTROPY, MASK, 0.5, rule="quantile")
    assert positions(selected) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    # rho = 0.25 -> position 0.75 * 6 = 4.5, still between the two 2.0s; rho = 0.4 -> position
    # 3.6 -> 1.0 + 0.6 * (2.0 - 1.0) = 1.6 -> the three tokens >= 1.6.
    assert len(positions(top_entropy_mask(ENTROPY, MASK, 0.4, rule="quantile"))) == 3


def test_per_response_by_hand():
    # Row 0: n = 3, k = ceil(1.5) = 2 -> 2.0, 1.0. Row 1: n = 4, k = 2 -> 3.0, 2.0.
    selected = top_entropy_mask(ENTROPY, MASK, 0.5, per_response=True)
    assert positions(selected) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    # A row without valid tokens keeps nothing; one valid token is always kept.
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    assert positions(top_entropy_mask(ENTROPY, mask, 0.2, per_response=True)) == [(1, 1)]


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.2, 0.37, 0.5, 0.9, 1.0])
def test_quantile_rule_matches_torch_quantile(rho):
    # TRL: threshold = torch.quantile(valid entropies, 1 - rho); keep valid tokens >= threshold.
    generator = torch.Generator().manual_seed(1)
    entropy = torch.rand(5, 11, generator=generator) * 4
    mask = torch.rand(5, 11, generator=generator) > 0.3
    threshold = torch.quantile(entropy[mask], 1 - rho)
    expected = (entropy >= threshold) & mask
    assert torch.equal(top_entropy_mask(entropy, mask, rho, rule="quantile"), expected)


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("per_response", [False, True])
def test_count_rule_properties(rho, per_response):
    generator = torch.Generator().manual_seed(2)
    entropy = torch.rand(6, 13, generator=generator)
    mask = torch.rand(6, 13, generator=generator) > 0.4
    mask[0] = False  # an empty response
    entropy[~mask] = 100.0  # padding looks most attractive of all
    selected = top_entropy_mask(entropy, mask, rho, per_response=per_response)
    assert not (selected & ~mask).any()
    pools = (
        [(selected[r], entropy[r], mask[r]) for r in range(6)]
        if per_response
        else [(selected.flatten(), entropy.flatten(), mask.flatten())]
    )
    for kept, values, valid in pools:
        n = int(valid.sum())
        k = min(n, max(1, math.ceil(rho * n - 1e-9))) if n else 0
        assert int(kept.sum()) == k
        if 0 < k < n:
            assert values[kept].min() >= values[valid & ~kept].max()


def test_no_valid_token_selects_nothing_and_no_grad():
    entropy = torch.rand(2, 3, requires_grad=True)
    for rule in ("count", "quantile"):
        selected = top_entropy_mask(entropy, torch.zeros(2, 3), 0.2, rule=rule)
        assert not selected.any() and not selected.requires_grad
    # NaN entropy is treated as padding.
    values = torch.tensor([[math.nan, 1.0, 2.0]])
    assert positions(top_entropy_mask(values, torch.ones(1, 3), 0.0)) == [(0, 2)]
    assert not top_entropy_mask(values, torch.ones(1, 3), 1.0, rule="quantile")[0, 0]


def test_selection_stats_by_hand():
    # Kept (0, 1) = 2.0 and (1, 0) = 3.0 -> mean 2.5; rejected 0.5, 1.0, 0.1, 2.0, 0.7 -> 0.86;
    # fraction 2 / 7.
    selected = top_entropy_mask(ENTROPY, MASK, 0.2)
    stats = selection_stats(ENTROPY, MASK, selected)
    torch.testing.assert_close(stats["fraction"], torch.tensor(2 / 7))
    torch.testing.assert_close(stats["selected_mean"], torch.tensor(2.5))
    torch.testing.assert_close(stats["rejected_mean"], torch.tensor(0.86))
    empty = selection_stats(ENTROPY, torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    assert empty["fraction"] == 0 and torch.isnan(empty["selected_mean"])


def test_selection_threshold_by_hand():
    # rho 0.4 over 7 valid tokens keeps ceil(2.8) = 3: 3.0, 2.0 (0, 1), 2.0 (1, 2) -> lowest 2.0;
    # the padding's 9.9 is never the threshold. Per response (rho 0.4): row 0 keeps ceil(1.2) = 2
    # (2.0, 1.0) -> 1.0, row 1 keeps ceil(1.6) = 2 (3.0, 2.0) -> 2.0; mean 1.5.
    batch = top_entropy_mask(ENTROPY, MASK, 0.4)
    torch.testing.assert_close(selection_threshold(ENTROPY, MASK, batch), torch.tensor(2.0))
    rows = top_entropy_mask(ENTROPY, MASK, 0.4, per_response=True)
    torch.testing.assert_close(
        selection_threshold(ENTROPY, MASK, rows, per_response=True), torch.tensor(1.5)
    )
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.isnan(selection_threshold(ENTROPY, MASK, nothing))


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="quantile must be in"):
        top_entropy_mask(ENTROPY, MASK, 1.5)
    with pytest.raises(ValueError, match="rule"):
        top_entropy_mask(ENTROPY, MASK, 0.2, rule="topk")
    with pytest.raises(ValueError, match="same shape"):
        top_fraction_mask(ENTROPY, MASK[:, :2], 0.2)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(ENTROPY, MASK, True)  # type: ignore[arg-type]
