"""Token-budget packing, equal micro-batch counts across ranks, exact mini-batch weights, and
the global batch std."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.batching import equalise_count, micro_batch_weights, pack_by_tokens
from cppo_lightning.losses import aggregate, global_std, group_advantages


def test_packing_sorts_by_length_and_keeps_the_budget():
    lengths = torch.tensor([50, 5, 30, 10, 200, 12])
    # prompt 10: [5, 10, 12] costs 3 * (10 + 12) = 66 <= 70; adding 30 would cost 4 * 40.
    micros = pack_by_tokens(lengths, prompt_length=10, budget=70)
    assert [m.tolist() for m in micros] == [[1, 3, 5], [2], [0], [4]]
    # Every response once; the 200-token one alone, over budget.
    assert sorted(torch.cat(micros).tolist()) == list(range(6))
    for m in micros[:-1]:
        assert len(m) * (10 + int(lengths[m].max())) <= 70


def test_equalise_splits_the_largest_until_the_count_matches():
    micros = [torch.tensor([0, 1, 2, 3]), torch.tensor([4])]
    out = equalise_count(micros, 4)
    assert [m.tolist() for m in out] == [[0], [1], [2, 3], [4]]
    assert equalise_count(micros, 2) == micros
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        equalise_count([torch.tensor([0])], 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-sum-constant"])
def test_weighted_micro_batch_losses_sum_to_the_mini_batch_loss(agg):
    torch.manual_seed(0)
    values = torch.randn(7, 9, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3, 8])
    mask = (torch.arange(9) < lengths[:, None]).long()
    whole = aggregate(values, mask, agg, constant=9.0)
    micros = [torch.tensor([1, 3, 5]), torch.tensor([2, 0]), torch.tensor([6, 4])]
    weights = micro_batch_weights([mask[m] for m in micros], agg)
    assert sum(weights) == pytest.approx(1.0)
    parts = sum(
        w * aggregate(values[m][:, :cut], mask[m][:, :cut], agg, constant=9.0)
        for m, w in zip(micros, weights, strict=True)
        for cut in [max(1, int(lengths[m].max()))]  # each micro-batch cut to its longest
    )
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)


def test_global_std_of_two_ranks_is_the_std_of_the_whole_batch():
    torch.manual_seed(1)
    rewards = torch.rand(16, dtype=torch.float64)
    halves = rewards[:8], rewards[8:]
    sums = sum(torch.stack([torch.tensor(8.0, dtype=torch.float64), h.sum(), h.square().sum()])
               for h in halves)  # fmt: skip
    std = global_std(*sums)
    torch.testing.assert_close(std, rewards.std(), rtol=0, atol=1e-12)
    # Rank 0's advantages under the global std equal the whole batch's, rows 0-7.
    whole = group_advantages(rewards, 4, scale="batch")
    local = group_advantages(halves[0], 4, scale="batch", batch_std=std)
    torch.testing.assert_close(local, whole[:8], rtol=0, atol=1e-12)
    assert not torch.allclose(group_advantages(halves[0], 4, scale="batch"), whole[:8])
