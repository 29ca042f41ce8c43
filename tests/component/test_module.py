"""CPPOModule pieces: reference handling (deep copy vs LoRA), mini-batches, checkpoint filtering."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.module import CPPOModule, LoraSettings
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import Sampling
from tests.helpers.rewards import length_reward


def _module(path, **kwargs) -> CPPOModule:
    reward = WeightedReward({"length": length_reward}, {"length": 1.0})
    module = CPPOModule(model_name_or_path=str(path), reward=reward, group_size=2, **kwargs)
    module.configure_model()
    return module


def _rollout(module: CPPOModule, rows):
    prompts = PromptCollator(module.processor, "Answer.")(rows)
    torch.manual_seed(0)
    return module.collect_rollout(prompts, Sampling(max_new_tokens=8))


def test_lora_reference_is_the_base_model_with_adapters_off(
    tiny_model_dir, tiny_policy, shapes_rows
):
    module = _module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    assert module.reference is None
    rollout = _rollout(module, shapes_rows[:2])
    index = torch.arange(rollout.num_responses)
    # Make the adapters matter, then check the reference still equals the untouched base model.
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        ref = module.update._reference_logps(rollout, index)
        base = module.update.sequence_logps(tiny_policy[0], rollout, index)
        adapted = module.update.sequence_logps(module.policy, rollout, index)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(ref[mask], base[mask])
    assert not torch.allclose(adapted[mask], base[mask])
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_several_mini_batches_recompute_old_logps(tiny_model_dir, shapes_rows):
    module = _module(tiny_model_dir, mini_batch_size=1)
    rollout = module.update.prepare_update(_rollout(module, shapes_rows[:2]))
    assert rollout.old_logp is not None and rollout.old_logp.shape == rollout.response_ids.shape
    assert rollout.ref_logp is not None and rollout.advantages is not None
    # Before any update, old, reference and current log-probs coincide.
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.old_logp[mask], rollout.ref_logp[mask])
    assert [len(m) for m in module.update._mini_batches(rollout)] == [2, 2]


def test_one_mini_batch_skips_the_old_logp_pass(tiny_model_dir, shapes_rows):
    module = _module(tiny_model_dir, kl_coef=0.0)
    rollout = module.update.prepare_update(_rollout(module, shapes_rows[:2]))
    assert rollout.old_logp is None and rollout.ref_logp is None


def test_a_batch_that_lost_a_row_keeps_a_smaller_last_mini_batch(tiny_model_dir, shapes_rows):
    # data.batch_size must be a multiple of mini_batch_size (checked at fit start); a batch
    # that lost a row to an unreadable image still trains, with a smaller last mini-batch.
    module = _module(tiny_model_dir, mini_batch_size=2)
    rollout = _rollout(module, shapes_rows[:3])
    sizes = [len(m) for m in module.update._mini_batches(rollout)]
    assert sizes == [2 * rollout.group_size, rollout.group_size]


def test_checkpoint_keeps_only_trainable_weights(tiny_model_dir):
    module = _module(tiny_model_dir)
    checkpoint = {"state_dict": module.state_dict()}
    assert any(k.startswith("reference.") for k in checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == {f"policy.{n}" for n, _ in module.policy.named_parameters()}
    module.on_load_checkpoint(checkpoint)  # complete: no error
    del checkpoint["state_dict"][next(iter(kept))]
    with pytest.raises(ValueError, match="resume with the same model_name_or_path and lora"):
        module.on_load_checkpoint(checkpoint)


def test_training_step_without_rollout_names_the_callback(tiny_model_dir, shapes_rows):
    module = _module(tiny_model_dir)
    prompts = PromptCollator(module.processor, "Answer.")(shapes_rows[:2])
    with pytest.raises(RuntimeError, match="RolloutCallback"):
        module._take_rollout(prompts)


def test_no_reference_copy_without_the_kl_term(tiny_model_dir):
    assert _module(tiny_model_dir, kl_coef=0.0).reference is None
    assert _module(tiny_model_dir).reference is not None


def test_tiny_model_build_is_deterministic():
    from cppo_lightning.tiny import build_random_tiny

    (a, pa), (b, pb) = (
        build_random_tiny(seed=5, num_layers=1),
        build_random_tiny(seed=5, num_layers=1),
    )
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_fp16_precision_is_refused_with_the_alternative():
    # Lightning turns 16-mixed into bf16-mixed on CPU, so the GPU case is staged with a stand-in.
    from types import SimpleNamespace

    # Checked in setup, before any model is loaded.
    module = CPPOModule()
    trainer = SimpleNamespace(precision="16-mixed", datamodule=None, max_steps=-1)
    module.trainer = trainer  # type: ignore[assignment]
    with pytest.raises(ValueError, match="use bf16-mixed"):
        module.setup("fit")
    module.trainer = SimpleNamespace(**{**vars(trainer), "precision": "bf16-mixed"})  # type: ignore[assignment]
    module.setup("fit")


def test_checkpoint_keys_match_parameters_behind_wrappers(tiny_model_dir):
    # FSDP and activation-checkpoint wrappers add names to named_parameters() that state-dict
    # keys do not carry: the trainable-weight filter must see through them.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    module = _module(tiny_model_dir)
    layers = module.policy.model.language_model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    assert any("_checkpoint_wrapped_module" in n for n, _ in module.policy.named_parameters())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(".layers.0." in key for key in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == module._trainable_keys()


@pytest.mark.parametrize(("period", "warns"), [(10, True), (20, False)])
def test_a_cosine_period_shorter_than_the_run_warns(tiny_model_dir, period, warns):
    """base.yaml's cosine decay has T_max = trainer.max_steps; a T_max below max_steps (the rate
    would rise again) is warned about, naming both keys."""
    import warnings
    from types import SimpleNamespace

    module = _module(
        tiny_model_dir,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=period
        ),
    )
    module._trainer = SimpleNamespace(max_steps=20)  # type: ignore[assignment]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.configure_optimizers()
    named = [w for w in caught if "T_max=10 < trainer.max_steps=20" in str(w.message)]
    assert bool(named) == warns


def test_val_accuracy_term_must_be_a_term_of_the_reward(caplog):
    reward = WeightedReward({"length": length_reward}, {"length": 1.0})
    with pytest.raises(ValueError) as error:
        CPPOModule(
            reward=reward
        ).validation.check_val_accuracy_term()  # the default term, `accuracy`
    assert str(error.value) == (
        "model.val_accuracy_term='accuracy' is not a term of model.reward (its terms: length): "
        "set model.val_accuracy_term to one of them, or to null to log no val/accuracy."
    )
    with caplog.at_level("INFO"):
        CPPOModule(reward=reward, val_accuracy_term="length").validation.check_val_accuracy_term()
        CPPOModule(reward=reward, val_accuracy_term=None).validation.check_val_accuracy_term()
    messages = [r.getMessage() for r in caplog.records if "val/accuracy" in r.getMessage()]
    assert messages == [
        "validation: val/accuracy is the mean of reward term 'length' (model.val_accuracy_term)",
        "validation: no val/accuracy is logged (model.val_accuracy_term is null)",
    ]
