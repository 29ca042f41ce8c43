"""Settings of :class:`~cppo_lightning.module.CPPOModule` that cannot work, refused with what to
change: at construction (:func:`check_module_settings`, before any model is loaded), at fit
``setup`` (:func:`check_fit_settings`, once the trainer and the DataModule are known) and at fit
start (:func:`check_components`, once the callbacks have handed over their parts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cppo_lightning.logprobs import Scoring
from cppo_lightning.losses.grpo import check_clip_settings

__all__ = ["check_components", "check_fit_settings", "check_module_settings"]

# The defaults of model.clip_low, clip_high and dual_clip: they configure the default policy loss.
DEFAULT_CLIP = (0.2, 0.2, 3.0)


def check_module_settings(
    *,
    group_size: int,
    temperature: float,
    mini_batch_size: int | None,
    micro_batch_size: int,
    micro_batch_tokens: int | None,
    logprob_chunk_tokens: int | None,
    clip: tuple[float, float, float | None],
    policy_loss: Any,
    kl_coef: float,
    val_samples: int,
    val_temperature: float,
) -> None:
    """Refuse constructor arguments of the module that cannot work (see its docstring)."""
    if group_size < 2:
        raise ValueError(
            f"group_size (rollout.group_size) must be >= 2 for group advantages, got {group_size}."
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    if mini_batch_size is not None and mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1 or null, got {mini_batch_size}.")
    if temperature <= 0:
        raise ValueError(
            f"temperature (rollout.temperature) must be > 0 for sampling, got {temperature}."
        )
    check_clip_settings(*clip, prefix="model.")
    if policy_loss is not None and tuple(clip) != DEFAULT_CLIP:
        clip_low, clip_high, dual_clip = clip
        raise ValueError(
            f"model.clip_low/clip_high/dual_clip ({clip_low}, {clip_high}, {dual_clip}) "
            f"configure the default token-level ratio, but model.policy_loss is "
            f"{type(policy_loss).__name__}: set the clip range in model.policy_loss.init_args "
            "and leave model.clip_low, clip_high and dual_clip at their defaults."
        )
    if kl_coef < 0.0:
        raise ValueError(
            f"model.kl_coef must be >= 0 (0 turns the KL term off), got {kl_coef}: a negative "
            "weight would reward moving away from the reference."
        )
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(
            f"micro_batch_tokens must be >= 1 or null, got {micro_batch_tokens}: it is the "
            "token budget (responses x (prompt + longest response)) of one micro-batch."
        )
    Scoring(temperature, chunk_tokens=logprob_chunk_tokens)  # validates the chunk size
    if val_samples < 1 or (val_temperature == 0 and val_samples > 1):
        raise ValueError(
            f"val_samples must be >= 1, and 1 with greedy decoding (val_temperature=0); got "
            f"val_samples={val_samples}, val_temperature={val_temperature}."
        )


def check_fit_settings(
    *,
    precision: str,
    batch_size: int | None,
    mini_batch_size: int | None,
    steps_per_batch: int,
    max_steps: int,
) -> None:
    """Refuse trainer and data settings the training step cannot honour."""
    if str(precision).startswith("16"):
        # Gradients are clipped and their norm logged before the optimizer step, where fp16's
        # loss scaling has not been undone yet.
        raise ValueError(
            f"trainer.precision={precision} is not supported: use bf16-mixed (GPUs) or 32-true."
        )
    if mini_batch_size and batch_size is not None and batch_size % mini_batch_size:
        raise ValueError(
            f"data.batch_size={batch_size} is not a multiple of model.mini_batch_size="
            f"{mini_batch_size}: make data.batch_size a multiple of it."
        )
    if max_steps > 0 and max_steps % steps_per_batch:
        # Each rollout batch makes all its optimizer steps: the run would end past max_steps,
        # where a schedule sized to max_steps (the cosine of configs/base.yaml) rises again.
        lower = max_steps - max_steps % steps_per_batch
        nearest = " or ".join(str(v) for v in (lower, lower + steps_per_batch) if v > 0)
        raise ValueError(
            f"trainer.max_steps={max_steps} is not a multiple of the {steps_per_batch} optimizer "
            f"steps each rollout batch makes (data.batch_size={batch_size} / "
            f"model.mini_batch_size={mini_batch_size}): set trainer.max_steps to {nearest}."
        )


def check_components(
    components: Mapping[str, Any],
    views: Sequence[str] | None,
    *,
    callbacks_set: bool,
) -> None:
    """Refuse a method whose components need image views the DataModule does not draw, or a
    token-selecting perception objective without its two callbacks.

    Args:
        components: ``model.<key>`` -> component (None where a seam is empty).
        views: The views training batches carry (``data.*_view``); None when unknown.
        callbacks_set: Whether the perception-token selector and the CPL weight were handed over.
    """
    for key, component in components.items():
        if component is None:
            continue
        needed = tuple(getattr(component, "views", ()))
        if "removed_logp" in getattr(component, "needs", ()):
            needed += ("removing",)
        missing = sorted({v for v in needed if views is not None and v not in views})
        if missing:
            raise ValueError(
                f"model.{key}={type(component).__name__} needs the "
                f"{' and '.join(missing)} view(s): set "
                f"{', '.join(f'data.{v}_view' for v in missing)} (see configs/base.yaml and "
                "configs/perturbations/)."
            )
    objective = components.get("perception_loss")
    if objective is not None and objective.selects_tokens and not callbacks_set:
        raise ValueError(
            f"model.perception_loss={type(objective).__name__} needs the perception_tokens and "
            "cpl_weight callbacks: add the `perception_tokens:` and `cpl_weight:` sections "
            "(configs/base.yaml has them)."
        )


def require_token_objective(objective: Any, section: str) -> None:
    """Refuse the ``perception_tokens:`` / ``cpl_weight:`` sections without CPPO's objective."""
    if objective is None or not objective.selects_tokens:
        name = type(objective).__name__ if objective else None
        raise ValueError(
            f"`{section}:` configures CPPO's contrastive perception loss, but "
            f"model.perception_loss is {name}: set `{section}: null` (the grpo and papo "
            "overlays do) or use cppo_lightning.perception.ContrastivePerception."
        )
