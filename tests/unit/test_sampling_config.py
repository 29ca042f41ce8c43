"""The generate configuration built from the rollout settings: valid as HF checks it, and not
changed by HF's global defaults."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from cppo_lightning.rollout import Sampling


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_configuration_passes_hf_strict_validation(temperature):
    config = Sampling(max_new_tokens=8, temperature=temperature).generation_config(
        eos_token_ids=[2], pad_token_id=0, suppress_token_ids=[5, 6]
    )
    config.validate(strict=True)  # raises on any issue HF would only warn about
    assert config.do_sample is (temperature != 0)


def test_hf_global_defaults_do_not_add_a_top_k_when_sampling():
    """HF fills unset values from its global defaults (top_k 50); sampling must keep 0."""
    config = Sampling(max_new_tokens=8).generation_config(
        eos_token_ids=[2], pad_token_id=0, suppress_token_ids=[]
    )
    config.update(**GenerationConfig()._get_default_generation_params(), defaults_only=True)
    assert (config.top_k, config.top_p, config.temperature) == (0, 1.0, 1.0)
