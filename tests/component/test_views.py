"""Paired views in the DataModule, and the perception objectives on the tiny policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.data.synthetic import SyntheticShapes
from cppo_lightning.detection import TokenSelector
from cppo_lightning.module import CPPOModule
from cppo_lightning.perception import ContrastivePerception
from cppo_lightning.perturbations import PatchMask, ZoomCrop
from cppo_lightning.rollout import Sampling


class Identity(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Shrink(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., :-14, :-14]


class FakeTrainer:
    training = True
    current_epoch = 0


def _datamodule(model_dir, preserving, removing):  # type: ignore[no-untyped-def]
    dm = VisionLanguageDataModule(
        SyntheticShapes(num_train=8, num_val=4, seed=0),
        processor_name_or_path=str(model_dir),
        batch_size=4,
        preserving_view=preserving,
        removing_view=removing,
    )
    dm.setup("fit")
    dm.trainer = FakeTrainer()  # type: ignore[assignment]
    return dm


def _first_batch(dm, epoch=0):  # type: ignore[no-untyped-def]
    dm.trainer.current_epoch = epoch
    rows = [dm.splits["train"][i] | {"__row_index__": i} for i in range(4)]
    return dm.on_after_batch_transfer(dm.collate(rows), 0)


def test_views_reuse_the_prompt_and_the_grid(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, Identity(), ZoomCrop())
    batch = _first_batch(dm)
    views = batch.views
    assert views is not None and len(views.preserving) == len(views.removing) == 4
    # An identity view is patchified exactly like the original.
    original = batch.vision["pixel_values"]
    torch.testing.assert_close(views.vision_pos["pixel_values"], original, rtol=0, atol=0)
    assert views.vision_neg["pixel_values"].shape == original.shape
    assert not torch.equal(views.vision_neg["pixel_values"], original)
    assert torch.equal(views.vision_neg["image_grid_thw"], batch.vision["image_grid_thw"])


def test_views_are_drawn_per_row_and_epoch(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, None, ZoomCrop())
    state = torch.get_rng_state()
    first, again = _first_batch(dm), _first_batch(dm)
    assert torch.equal(torch.get_rng_state(), state), "drawing views moved the global RNG"
    negative = first.views.vision_neg["pixel_values"]
    assert torch.equal(negative, again.views.vision_neg["pixel_values"])
    later = _first_batch(dm, epoch=1)
    assert not torch.equal(negative, later.views.vision_neg["pixel_values"])
    assert first.views.preserving is None and first.views.vision_pos is None


def test_a_view_that_changes_the_size_is_named(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, None, Shrink())
    with pytest.raises(ValueError, match="Shrink"):
        _first_batch(dm)


def test_a_rollout_view_that_changes_the_size_is_named(tiny_model_dir):
    # NoisyRollout's images go through the views' encoder: same size, same tensors as the
    # originals when unchanged; another size is refused naming rollout.view.
    dm = _datamodule(tiny_model_dir, None, ZoomCrop())
    batch = _first_batch(dm)
    same = dm.encode_view(batch.images, batch)
    assert torch.equal(same["image_grid_thw"], batch.vision["image_grid_thw"])
    torch.testing.assert_close(same["pixel_values"], batch.vision["pixel_values"], rtol=0, atol=0)
    smaller = [image[:, : image.shape[1] // 2, : image.shape[2] // 2] for image in batch.images]
    with pytest.raises(ValueError, match=r"rollout\.view gives .* must keep every image"):
        dm.encode_view(smaller, batch)


def test_validation_batches_carry_no_views(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, Identity(), PatchMask())
    dm.trainer.training = False
    rows = [dm.splits["validation"][i] for i in range(2)]
    assert dm.on_after_batch_transfer(dm.collate(rows), 0).views is None


def _cppo_module(model_dir, **kwargs):  # type: ignore[no-untyped-def]
    module = CPPOModule(
        str(model_dir),
        perception_loss=ContrastivePerception(),
        group_size=4,
        kl_coef=0.0,
        **kwargs,
    )
    module.configure_model()
    module.set_token_selector(TokenSelector(gate_advantages=False))
    module.set_cpl_weight(0.01)
    return module


def test_identical_views_select_nothing_and_add_no_loss(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, Identity(), Identity())
    module = _cppo_module(tiny_model_dir)
    batch = _first_batch(dm)
    rollout = module.update.prepare_update(module.collect_rollout(batch, Sampling(12, 1.0)))
    index = torch.arange(rollout.num_responses)
    _loss, stats, term = module.update.compute_loss(rollout, index)
    assert term is not None and term.mask is not None and not term.mask.any()
    assert stats["perception/cpl"] == 0 and stats["perception/selected_tokens"] == 0


def test_the_contrastive_term_trains_through_the_views(tiny_model_dir):
    dm = _datamodule(tiny_model_dir, Identity(), PatchMask(mask_prob=1.0))
    module = _cppo_module(tiny_model_dir)
    batch = _first_batch(dm)
    rollout = module.update.prepare_update(module.collect_rollout(batch, Sampling(12, 1.0)))
    index = torch.arange(rollout.num_responses)
    _, stats, term = module.update.compute_loss(rollout, index)
    assert term is not None and term.mask is not None
    assert term.mask.any() and stats["perception/selected_tokens"] > 0
    # The entropies detection scored with travel with the mask, for the monitor's baselines.
    assert term.entropy is not None and term.entropy_removed is not None
    assert term.entropy.shape == term.mask.shape
    assert (term.entropy_removed - term.entropy)[term.mask].min() > 0
    # The CPL alone (lambda large, policy loss zeroed by zero advantages) has a gradient.
    rollout = dataclasses.replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    module.set_cpl_weight(1.0)
    loss, stats, term = module.update.compute_loss(rollout, index)
    assert term is not None and term.mask is not None and term.mask.any()
    loss.backward()
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_a_micro_batch_with_every_response_gated_out_still_reports_entropies(tiny_model_dir):
    # Under DDP every rank's monitor all-reduces the same fields: a micro-batch whose responses
    # all have A <= 0 must still hand over (zero) entropies, not None.
    dm = _datamodule(tiny_model_dir, Identity(), PatchMask(mask_prob=1.0))
    module = _cppo_module(tiny_model_dir)
    module.set_token_selector(TokenSelector(gate_advantages=True))
    rollout = module.update.prepare_update(
        module.collect_rollout(_first_batch(dm), Sampling(12, 1.0))
    )
    rollout = dataclasses.replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    _, stats, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    assert stats["perception/gated_fraction"] == 0
    assert term is not None and term.mask is not None and not term.mask.any()
    assert term.entropy is not None and term.entropy_removed is not None
    assert not term.entropy.any() and term.entropy.shape == term.mask.shape
