"""Token-budget micro-batches give exactly the loss and gradients of one big micro-batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.module import CPPOModule
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import Sampling
from tests.helpers.rewards import length_reward


def _module(path, **kwargs) -> CPPOModule:  # type: ignore[no-untyped-def]
    reward = WeightedReward({"length": length_reward}, {"length": 1.0})
    module = CPPOModule(
        model_name_or_path=str(path), reward=reward, group_size=4, max_new_tokens=12, **kwargs
    )
    module.configure_model()
    module.policy.double().eval()  # float64 so that the comparison can be tight
    if module.reference is not None:
        module.reference.double()
    return module


def _varied_rollout(module, rows):  # type: ignore[no-untyped-def]
    prompts = PromptCollator(module.processor, "Answer.")(rows)
    torch.manual_seed(0)
    rollout = module.collect_rollout(prompts, Sampling(max_new_tokens=12))
    # A random tiny model rarely ends early: cut the responses to lengths from 1 to 12.
    lengths = torch.tensor([12, 1, 5, 9, 3, 12, 7, 2, 11, 4, 6, 8])[: rollout.num_responses]
    mask = (torch.arange(rollout.response_ids.shape[1]) < lengths[:, None]).long()
    ids = rollout.response_ids.masked_fill(mask == 0, module.processor.tokenizer.pad_token_id)
    rollout = dataclasses.replace(rollout, response_ids=ids, response_mask=mask, sampler_logp=None)
    return module.update.prepare_update(rollout)


def _gradients(module, rollout):  # type: ignore[no-untyped-def]
    module.policy.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    count = module.update.accumulate_gradients(
        rollout, torch.arange(rollout.num_responses), sums, []
    )
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return count, grads


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-sum-constant"])
def test_token_budget_equals_one_big_micro_batch(tiny_model_dir, shapes_rows, agg):
    module = _module(tiny_model_dir, loss_agg=agg, kl_coef=0.05, micro_batch_size=64)
    rollout = _varied_rollout(module, shapes_rows[:3])
    one, expected = _gradients(module, rollout)
    assert one == 1
    prompt = rollout.prompts.input_ids.shape[1]
    module.micro_batch_tokens = 3 * (prompt + 6)  # a handful of responses per micro-batch
    several, actual = _gradients(module, rollout)
    assert several >= 3
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-10)
    # Fixed counts cut the other way give the same gradient too.
    module.micro_batch_tokens, module.micro_batch_size = None, 5
    _, fixed = _gradients(module, rollout)
    for name in expected:
        torch.testing.assert_close(fixed[name], expected[name], rtol=0, atol=1e-10)


def test_packing_pads_less(tiny_model_dir, shapes_rows):
    module = _module(tiny_model_dir, micro_batch_size=4)
    rollout = _varied_rollout(module, shapes_rows[:3])
    index = torch.arange(rollout.num_responses)

    def padded_tokens() -> int:
        micros = module.update._micro_batches(rollout, index)
        return sum(int(rollout.take(m).response_mask.numel()) for m in micros)

    fixed = padded_tokens()
    module.micro_batch_tokens = 4 * (rollout.prompts.input_ids.shape[1] + 6)
    packed = padded_tokens()
    assert packed < fixed <= rollout.response_mask.numel()


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        CPPOModule(micro_batch_tokens=0)
