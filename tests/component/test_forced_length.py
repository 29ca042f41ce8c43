"""``HFGenerate(min_new_tokens=...)``: responses forced to a length (benchmarks/gpu_check.py), with
the sampler's log-probs still the policy's own, so ``rollout/logp_mismatch`` keeps measuring
numerics."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.module import CPPOModule
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import HFGenerate, Sampling
from tests.helpers.rewards import length_reward

LENGTH = 40


@pytest.fixture(scope="module")
def embedded():  # type: ignore[no-untyped-def]
    """The embedded model: trained, it ends its responses well before LENGTH tokens."""
    reward = WeightedReward({"length": length_reward}, {"length": 1.0})
    module = CPPOModule(model_name_or_path="builtin:tiny-qwen2.5-vl", reward=reward, group_size=4)
    module.configure_model()
    module.policy.eval()
    return module


def _rollout(module, rows, engine):  # type: ignore[no-untyped-def]
    prompts = PromptCollator(module.processor, "Answer.")(rows)
    torch.manual_seed(0)
    return module.collect_rollout(prompts, Sampling(max_new_tokens=LENGTH), engine=engine)


def test_responses_run_to_the_forced_length_and_log_probs_stay_the_policys(embedded, shapes_rows):
    free = _rollout(embedded, shapes_rows[:2], HFGenerate())
    assert free.response_mask.sum(1).min() < LENGTH  # the model ends responses on its own
    forced = _rollout(embedded, shapes_rows[:2], HFGenerate(min_new_tokens=LENGTH))
    assert forced.response_ids.shape == (8, LENGTH)
    assert bool(forced.response_mask.all())  # every response has LENGTH valid tokens
    assert bool(forced.truncated.all())  # none ended: all cut by the length limit
    with torch.no_grad():
        train = embedded.update.sequence_logps(embedded.policy, forced, torch.arange(8))
    # Recorded before end-of-sequence is masked: the distribution training scores, so the
    # mismatch is numerics (the masked sampler's own log-probs would be higher by the EOS mass).
    gap = (forced.sampler_logp - train).abs()
    assert gap.max() < 1e-4, gap.max()


def test_a_shorter_minimum_only_delays_the_end(embedded, shapes_rows):
    rollout = _rollout(embedded, shapes_rows[2:4], HFGenerate(min_new_tokens=12))
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() >= 12
    assert lengths.min() < LENGTH  # ends are still sampled after the minimum


@pytest.mark.parametrize("value", [-1, True, 2.5])
def test_a_bad_minimum_is_refused(value):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="min_new_tokens"):
        HFGenerate(min_new_tokens=value)
