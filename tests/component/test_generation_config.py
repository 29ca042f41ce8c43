"""Rollouts sample from exactly the distribution the training log-probs describe, whatever the
checkpoint's generation_config says."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from cppo_lightning import rollout as rollout_module
from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.module import CPPOModule
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import Sampling
from tests.helpers.rewards import length_reward

# What Qwen-VL Instruct checkpoints ship, made extreme: top_k 1 would make every sample greedy.
CHECKPOINT_SETTINGS = {
    "repetition_penalty": 1.05,
    "top_k": 1,
    "temperature": 0.01,
    "do_sample": True,
}


@pytest.fixture(scope="module")
def opinionated_model_dir(tiny_model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("opinionated") / "model"
    shutil.copytree(tiny_model_dir, path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(CHECKPOINT_SETTINGS)
    config_file.write_text(json.dumps(config))
    return path


def _module(path) -> CPPOModule:  # type: ignore[no-untyped-def]
    reward = WeightedReward({"length": length_reward}, {"length": 1.0})
    module = CPPOModule(model_name_or_path=str(path), reward=reward, group_size=4)
    module.configure_model()
    return module


def test_the_checkpoint_settings_would_change_sampling(opinionated_model_dir, shapes_rows):
    """Without the explicit configuration, generate applies them: top_k 1 -> identical samples."""
    module = _module(opinionated_model_dir)
    prompts = PromptCollator(module.processor, "Answer.")(shapes_rows[:2])
    torch.manual_seed(0)
    sequences = module.policy.generate(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        **prompts.vision,
        mm_token_type_ids=prompts.mm_token_type_ids,
        max_new_tokens=8,
        num_return_sequences=4,
        pad_token_id=module.processor.tokenizer.pad_token_id,
    )
    assert all(torch.equal(sequences[0], row) for row in sequences[1:4])


def test_rollouts_ignore_the_checkpoint_and_match_training(
    opinionated_model_dir, shapes_rows, caplog
):
    module = _module(opinionated_model_dir)
    module.policy.eval()
    prompts = PromptCollator(module.processor, "Answer.")(shapes_rows[:3])
    rollout_module._REPORTED.clear()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        rollout = module.collect_rollout(prompts, Sampling(max_new_tokens=12, temperature=1.0))
    messages = [r.getMessage() for r in caplog.records if "generation_config" in r.getMessage()]
    assert len(messages) == 1, messages
    for key in CHECKPOINT_SETTINGS:
        assert key in messages[0]
    # The checkpoint's generation_config itself is left as it was (export writes it).
    assert module.policy.generation_config.top_k == 1
    # Sampled at temperature 1 from the whole vocabulary: the samples of a prompt differ.
    assert len({tuple(r.tolist()) for r in rollout.response_ids[:4]}) > 1
    mask = rollout.response_mask.bool()
    assert mask.sum() > 20
    with torch.no_grad():
        train = module.update.sequence_logps(
            module.policy, rollout, torch.arange(rollout.num_responses)
        )
    gap = (rollout.sampler_logp - train).abs()[mask]
    assert rollout.sampler_logp.dtype == torch.float32
    assert gap.mean() < 1e-5, gap.mean()
    # Padding carries no log-prob.
    assert (rollout.sampler_logp[~mask] == 0).all()


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampler_logps_follow_temperature_and_top_p(tiny_model_dir, shapes_rows, top_p):
    """At T = 0.7 the recorded log-probs are the tempered training ones; with top_p < 1 the
    sampler's truncated distribution shows up as a mismatch (it is what the metric is for)."""
    module = _module(tiny_model_dir)
    module.temperature = 0.7
    module.policy.eval()
    prompts = PromptCollator(module.processor, "Answer.")(shapes_rows[:3])
    torch.manual_seed(1)
    rollout = module.collect_rollout(
        prompts, Sampling(max_new_tokens=10, temperature=0.7, top_p=top_p, batch_size=4)
    )
    mask = rollout.response_mask.bool()
    with torch.no_grad():
        train = module.update.sequence_logps(
            module.policy, rollout, torch.arange(rollout.num_responses)
        )
    gap = (rollout.sampler_logp - train).abs()[mask]
    if top_p == 1.0:
        assert gap.max() < 1e-4
    else:
        # Truncation renormalises over the nucleus: the sampler's log-probs are higher.
        assert (rollout.sampler_logp - train)[mask].min() > -1e-4 and gap.mean() > 1e-3
