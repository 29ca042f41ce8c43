"""The LightningModule: owns the policy, the frozen reference, the settings, the method's
components, their set-up, rollouts and checkpoints.

It composes, and does not inherit, the two procedures that run over that state: the training
step (advantages, old/reference log-probs, mini- and micro-batches, the loss of a micro-batch) is
``module.update``, a :class:`~cppo_lightning.update.PolicyUpdate`, and held-out validation
(``val/*``) is ``module.validation``, a :class:`~cppo_lightning.validation.HeldOutValidation`.
The method's components sit at the seams of :mod:`cppo_lightning.seams` (``docs/methods.md``);
the math lives in :mod:`cppo_lightning.losses` and :mod:`cppo_lightning.methods`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torchmetrics import MeanMetric

from cppo_lightning.checkpoints import gather_rng_states, restore_rng_states
from cppo_lightning.detection import TokenSelector
from cppo_lightning.logprobs import Scoring
from cppo_lightning.methods import ClippedTokenRatio
from cppo_lightning.perception import (
    PerceptionObjective,
)
from cppo_lightning.policy import (
    DEFAULT_MODEL,
    LoraSettings,
    apply_lora,
    load_policy,
    load_processor,
    model_family,
    save_processor,
    suppressed_token_ids,
)
from cppo_lightning.records import PromptBatch, RolloutBatch, UpdateRecord
from cppo_lightning.resume import apply_configured_optimizer_settings, configured_optimizer_settings
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import HFGenerate, RolloutEngine, Sampling, collect_rollouts
from cppo_lightning.seams import (
    AdvantageTransform,
    GenerationGroup,
    LossTerm,
    PolicyLoss,
    TokenWeighting,
)
from cppo_lightning.settings_checks import (
    check_components,
    check_fit_settings,
    check_module_settings,
    require_token_objective,
)
from cppo_lightning.update import PolicyUpdate, is_fsdp
from cppo_lightning.validation import HeldOutValidation


@contextlib.contextmanager
def _root_parameters(module: Any) -> Iterator[None]:
    """Under FSDP, gather the root's own (unwrapped) parameters for ``generate``, which does not
    go through the root's forward; nested FSDP units gather theirs as they run. A no-op
    otherwise."""
    if not is_fsdp(module):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(module, writeback=False, recurse=False):
        yield


# Wrapper names FSDP and activation checkpointing insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _expect_eval_mode(reference: torch.nn.Module) -> None:
    """Lightning warns at fit start of the modules it finds in eval mode ("Found N module(s) in
    eval mode at the start of training"): the frozen reference is, by design (:meth:`CPPOModule.
    train` keeps it so). Only that exact count is silenced: a policy module left in eval mode
    changes the count, and the warning shows."""
    count = sum(1 for _ in reference.modules())
    warnings.filterwarnings(
        "ignore",
        message=rf"Found {count} module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
    )


class CPPOModule(LightningModule):
    """RL fine-tuning of a vision-language policy with a frozen reference: GRPO, plus CPPO's
    contrastive perception loss or PAPO's implicit perception loss (``perception_loss``).

    Args:
        model_name_or_path: Hugging Face hub name, local path, or ``builtin:NAME`` for a model
            shipped with the package (``builtin:tiny-qwen2.5-vl`` is the CPU default).
        dtype: Weight dtype of policy and reference (float32, bfloat16, float16).
        attn_implementation: transformers attention backend (``sdpa``, ``eager``,
            ``flash_attention_2``); the model's default when None.
        freeze_vision_tower: Keep the vision encoder fixed (with LoRA: no adapters in it).
        freeze_projector: Keep the vision-to-text projector fixed.
        activation_checkpointing: Recompute activations in the backward pass (saves memory).
        lora: LoRA settings; None trains all weights against a frozen deep copy.
        reward: Reward terms and weights; the paper's 0.9 accuracy + 0.1 format when None.
        perception_loss: Auxiliary loss on image views: :class:`ContrastivePerception` (CPPO),
            :class:`ImplicitPerception` (PAPO), or None for plain GRPO.
        advantage: Seam: a transform of each mini-batch's group advantages (VPPO's trajectory
            shaping); None keeps them (:mod:`cppo_lightning.seams`, ``docs/methods.md``).
        token_weighting: Seam: which tokens carry the policy gradient (high-entropy tokens,
            VPPO's dependent tokens, DAPO's truncated responses); None: every valid token.
        policy_loss: Seam: the surrogate and its importance ratio; None is GRPO's token-level
            clipped ratio from ``clip_low``, ``clip_high`` and ``dual_clip``
            (:class:`~cppo_lightning.methods.ClippedTokenRatio`); GSPO's sequence-level ratio
            carries its own clip range.
        extra_losses: Seam: further terms added to every micro-batch loss (entropy terms).
        group_size: G, responses per prompt. Linked from ``rollout.group_size``.
        temperature: Sampling temperature; log-probs are computed from ``logits / temperature``
            as in the sampler. Linked from ``rollout.temperature``.
        mini_batch_size: Prompts per optimizer step; the whole rollout batch when None. With
            more than one mini-batch the old log-probs are recomputed before the first update.
        micro_batch_size: Responses per forward/backward (gradient accumulation inside a
            mini-batch); bounds activation memory.
        micro_batch_tokens: Token budget per forward/backward instead of a fixed count:
            responses sorted by length are packed while ``responses x (prompt + longest
            response)`` fits (``micro_batch_size`` is then unused); None keeps fixed counts.
            Either way each micro-batch is cut to its longest response, and the gradient is
            the mini-batch's under ``loss_agg`` (see :mod:`cppo_lightning.batching`).
        logprob_chunk_tokens: Response positions per chunk of the LM head when log-probs and
            entropies are computed (:mod:`cppo_lightning.logprobs`): at most this many rows of
            ``[*, V]`` logits exist at once, recomputed in the backward. None sizes chunks to
            2**26 logits (441 positions at a 151,936 vocabulary; a whole micro-batch of the
            embedded model).
        clip_low: PPO clip range below 1 (eps_low).
        clip_high: PPO clip range above 1 (eps_high; > clip_low is DAPO's clip-higher).
        dual_clip: Dual-clip constant c for negative advantages (> 1); None disables it.
        kl_coef: beta, weight of the KL to the frozen reference; 0 skips the reference pass
            and, for full fine-tuning, the reference copy itself.
        kl_estimator: ``k3`` (default), ``k1`` or ``k2``.
        loss_agg: ``token-mean`` (default), ``seq-mean-token-mean`` or ``seq-sum-constant``
            (Dr. GRPO, normalised by ``max_new_tokens``).
        advantage_scale: ``group`` std (default), ``batch`` std, or ``none``.
        max_grad_norm: Gradient clipping by total norm; 0 disables it.
        max_new_tokens: Longest response; the Dr. GRPO normaliser. Linked from
            ``rollout.max_new_tokens``.
        val_temperature: Sampling temperature of held-out evaluation; 0 is greedy decoding.
            The default 1.0 with ``val_samples`` responses per prompt is the paper's avg@k
            protocol (avg@16 at temperature 1.0).
        val_samples: Responses sampled per held-out prompt; accuracy is their mean (avg@k).
        val_accuracy_term: The reward term whose mean is logged as ``val/accuracy`` (a name in
            ``reward``'s functions); null logs no ``val/accuracy`` (``val/reward`` and
            ``val/response_length`` still are). A name the reward does not have is refused
            when fit or validate starts.
        generation_batch_size: Most responses per ``generate`` call in validation. Linked from
            ``rollout.generation_batch_size``.
        optimizer: Optimizer factory; AdamW(lr=1e-6, weight_decay=0.0) when None.
        lr_scheduler: Optional scheduler factory, stepped after every optimizer step.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
        activation_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        reward: WeightedReward | None = None,
        perception_loss: PerceptionObjective | None = None,
        advantage: AdvantageTransform | None = None,
        token_weighting: TokenWeighting | None = None,
        policy_loss: PolicyLoss | None = None,
        extra_losses: list[LossTerm] | None = None,
        group_size: int = 4,
        temperature: float = 1.0,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 16,
        micro_batch_tokens: int | None = None,
        logprob_chunk_tokens: int | None = None,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = 3.0,
        kl_coef: float = 0.01,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-sum-constant"] = "token-mean",
        advantage_scale: Literal["group", "batch", "none"] = "group",
        max_grad_norm: float = 1.0,
        max_new_tokens: int = 64,
        val_temperature: float = 1.0,
        val_samples: int = 4,
        val_accuracy_term: str | None = "accuracy",
        generation_batch_size: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_module_settings(
            group_size=group_size,
            temperature=temperature,
            mini_batch_size=mini_batch_size,
            micro_batch_size=micro_batch_size,
            micro_batch_tokens=micro_batch_tokens,
            logprob_chunk_tokens=logprob_chunk_tokens,
            clip=(clip_low, clip_high, dual_clip),
            policy_loss=policy_loss,
            kl_coef=kl_coef,
            val_samples=val_samples,
            val_temperature=val_temperature,
        )
        self.save_hyperparameters(
            ignore=[
                "reward",
                "perception_loss",
                "advantage",
                "token_weighting",
                "policy_loss",
                "extra_losses",
                "optimizer",
                "lr_scheduler",
            ]
        )
        self.model_name_or_path = model_name_or_path
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.freeze_vision_tower = freeze_vision_tower
        self.freeze_projector = freeze_projector
        self.activation_checkpointing = activation_checkpointing
        # A checkpoint's hyper-parameters hold the settings as a plain dict.
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.reward = reward if reward is not None else WeightedReward()
        self.perception_loss = perception_loss
        # The method's components at the seams of cppo_lightning.seams.
        self.advantage = advantage
        self.token_weighting = token_weighting
        self.policy_loss: PolicyLoss = (
            policy_loss
            if policy_loss is not None
            else ClippedTokenRatio(clip_low, clip_high, dual_clip)
        )
        self.extra_losses = list(extra_losses or [])
        # Set by the perception_tokens and cpl_weight callbacks (CPPO only).
        self.token_selector: TokenSelector | None = None
        self.cpl_weight: float | None = None
        self.last_update: UpdateRecord | None = None
        self.group_size = group_size
        self.temperature = temperature
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.loss_agg, self.advantage_scale = loss_agg, advantage_scale
        self.max_grad_norm = max_grad_norm
        self.max_new_tokens = max_new_tokens
        self.val_temperature = val_temperature
        self.val_samples = val_samples
        self.val_accuracy_term = val_accuracy_term
        self.generation_batch_size = generation_batch_size
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._configured_optimizer: list[dict[str, Any]] = []
        # Manual optimisation: one rollout batch makes several optimizer steps.
        self.automatic_optimization = False
        # Checkpoints hold only trainable weights (see on_save_checkpoint).
        self.strict_loading = False
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.processor: Any = None
        self._rollout: RolloutBatch | None = None
        self._rollout_for: PromptBatch | None = None  # when its prompts are not the batch
        # What samples every response; the rollout callback hands over its own in setup.
        self._rollout_engine: RolloutEngine = HFGenerate()
        self._engine_step = 0  # global_step when the engine last had the policy's weights
        # Validation's running means (module state: Lightning moves them with the module).
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.val_response_length = MeanMetric()
        # The procedures that run over this state.
        self.update = PolicyUpdate(self)
        self.validation = HeldOutValidation(self)

    # ------------------------------------------------------------------ model set-up
    def configure_model(self) -> None:
        """Load policy, reference and processor (once; the trainer calls it under its strategy)."""
        if self.policy is not None:
            return
        if self.lora is None and self.dtype_name in ("bfloat16", "float16"):
            rank_zero_warn(
                f"model.dtype={self.dtype_name} with full fine-tuning: AdamW updates smaller than "
                f"{self.dtype_name}'s resolution (most of them at lr 1e-6) are lost. Use "
                "model.dtype=float32 with trainer.precision=bf16-mixed, or LoRA."
            )
        self.processor = load_processor(self.model_name_or_path)
        policy = load_policy(
            self.model_name_or_path,
            self.dtype_name,
            self.attn_implementation,
            freeze_vision_tower=self.freeze_vision_tower and self.lora is None,
            freeze_projector=self.freeze_projector and self.lora is None,
            activation_checkpointing=self.activation_checkpointing,
        )
        if self.lora is not None:
            family = model_family(self.model_name_or_path)
            self.policy = apply_lora(
                policy,
                self.lora,
                exclude=(family.vision_tower if self.freeze_vision_tower else ())
                + (family.projector if self.freeze_projector else ()),
            )
        else:
            self.policy = policy
            if self.kl_coef > 0:  # without the KL term no reference is needed: save the copy
                self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
                _expect_eval_mode(self.reference)
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode.
        self.policy.train()
        self.suppress_token_ids = suppressed_token_ids(self.processor)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.trainable_parameters()]
        optimizer = (
            self.optimizer_factory(params)
            if self.optimizer_factory is not None
            else torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        )
        # Before a scheduler moves the rate: on resume these win over the checkpoint's.
        self._configured_optimizer = configured_optimizer_settings(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        period = getattr(scheduler, "T_max", None)  # cosine annealing's half period
        max_steps = self._trainer.max_steps if self._trainer is not None else -1
        if isinstance(period, int) and 0 < period < max_steps:
            rank_zero_warn(
                f"model.lr_scheduler.init_args.T_max={period} < trainer.max_steps={max_steps}: "
                "the cosine rate rises again after T_max steps. Set T_max to trainer.max_steps "
                "for one decay over the run."
            )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def setup(self, stage: str) -> None:
        # Before any model is loaded: settings that cannot work together fail here, not after
        # minutes of loading a large checkpoint or after the first rollout.
        if stage == "fit":
            self._check_fit_settings()

    def _data_batch_size(self) -> int | None:
        batch_size = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None)
        return batch_size if isinstance(batch_size, int) else None

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one rollout batch makes: ``data.batch_size / model.mini_batch_size``,
        1 without mini-batches (or outside a trainer)."""
        batch_size = self._data_batch_size()
        if not self.mini_batch_size or batch_size is None:
            return 1
        return -(-batch_size // self.mini_batch_size)

    def _check_fit_settings(self) -> None:
        check_fit_settings(
            precision=str(self.trainer.precision),
            batch_size=self._data_batch_size(),
            mini_batch_size=self.mini_batch_size,
            steps_per_batch=self.optimizer_steps_per_batch,
            max_steps=self.trainer.max_steps,
        )

    def on_fit_start(self) -> None:
        self._check_perception_setup()
        self.validation.check_val_accuracy_term()

    def on_train_start(self) -> None:
        # Lightning restored the checkpoint's optimizer settings over the configured ones.
        if self.trainer.ckpt_path is None or not self.trainer.optimizers:
            return
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        for change in apply_configured_optimizer_settings(
            self.trainer.optimizers[0], self._configured_optimizer, schedulers
        ):
            rank_zero_info(f"resume: {change}")

    def _check_perception_setup(self) -> None:
        check_components(
            {
                "perception_loss": self.perception_loss,
                "advantage": self.advantage,
                "token_weighting": self.token_weighting,
                "policy_loss": self.policy_loss,
                **{f"extra_losses[{i}]": term for i, term in enumerate(self.extra_losses)},
            },
            getattr(getattr(self.trainer, "datamodule", None), "view_names", None),
            callbacks_set=self.token_selector is not None and self.cpl_weight is not None,
        )

    def set_token_selector(self, selector: TokenSelector) -> None:
        """Which tokens the contrastive loss uses (called by the perception-token callback)."""
        require_token_objective(self.perception_loss, "perception_tokens")
        self.token_selector = selector

    def set_cpl_weight(self, weight: float) -> None:
        """lambda, the weight of the contrastive loss (called by the CPL-weight callback)."""
        require_token_objective(self.perception_loss, "cpl_weight")
        if weight < 0:
            raise ValueError(f"the CPL weight must be >= 0, got {weight}.")
        self.cpl_weight = float(weight)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        assert self.policy is not None, "configure_model() has not run"
        return (p for p in self.policy.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> CPPOModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never trains, dropout stays off
        return self

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.update.training_step(batch)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.validation.validation_step(batch)

    def on_validation_start(self) -> None:
        self.validation.on_validation_start()

    def on_validation_end(self) -> None:
        self.validation.on_validation_end()

    def on_validation_epoch_end(self) -> None:
        self.validation.on_validation_epoch_end()

    @property
    def scoring(self) -> Scoring:
        """How every forward turns hidden states into token scores (see
        :attr:`PolicyUpdate.scoring`)."""
        return self.update.scoring

    # ------------------------------------------------------------------ rollouts
    def collect_rollout(
        self,
        prompts: PromptBatch,
        sampling: Sampling,
        engine: RolloutEngine | None = None,
        parts: Sequence[GenerationGroup] | None = None,
    ) -> RolloutBatch:
        """Sample G responses per prompt with the current policy (through ``engine``,
        :attr:`rollout_engine` when None) and score them; ``parts``: a ``rollout.view``'s
        images to sample from (see :func:`~cppo_lightning.rollout.collect_rollouts`)."""
        assert self.policy is not None
        with self.generation_mode():
            return collect_rollouts(
                self.policy,
                self.processor,
                prompts,
                self.reward,
                sampling,
                group_size=self.group_size,
                suppress_token_ids=self.suppress_token_ids,
                engine=engine if engine is not None else self.rollout_engine,
                parts=parts,
            )

    def set_rollout_engine(self, engine: RolloutEngine) -> None:
        """Sample every response with ``engine``: training rollouts, validation and the
        ``Evaluation`` callback (the rollout callback hands over its engine in ``setup``)."""
        self._rollout_engine = engine
        self._engine_step = self.global_step

    @property
    def rollout_engine(self) -> RolloutEngine:
        """What samples this module's responses: :class:`HFGenerate` until
        :meth:`set_rollout_engine` gives another."""
        return self._rollout_engine

    def sync_rollout_engine(self) -> None:
        """Tell the engine of the policy's weights (``on_policy_update``) if optimizer steps were
        taken since it last was: after each training batch, or earlier when the ``Evaluation``
        callback samples first."""
        assert self.policy is not None
        if self.global_step != self._engine_step:
            self._engine_step = self.global_step
            self._rollout_engine.on_policy_update(self.policy)

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[None]:
        """The policy in eval mode, without gradients and (under FSDP) with the root's
        parameters gathered, for ``generate`` calls; its mode is restored afterwards."""
        assert self.policy is not None
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), self._generation_context():
                yield
        finally:
            self.policy.train(was_training)

    def _generation_context(self) -> contextlib.AbstractContextManager[None]:
        return _root_parameters(self.trainer.strategy.model if self._trainer is not None else None)

    @property
    def sharded(self) -> bool:
        """Whether the trainer wrapped this module with FSDP."""
        return self._trainer is not None and is_fsdp(self.trainer.strategy.model)

    def set_rollout(self, rollout: RolloutBatch, batch: PromptBatch | None = None) -> None:
        """Hand over the rollout batch that the next ``training_step`` learns from; ``batch``:
        the training batch it answers, when its prompts are not that batch (a ``rollout.filter``
        sampled others)."""
        self._rollout = rollout
        if batch is not None:
            self._rollout_for = batch

    def _take_rollout(self, batch: PromptBatch) -> RolloutBatch:
        rollout, self._rollout = self._rollout, None
        answered, self._rollout_for = self._rollout_for, None
        if answered is None and rollout is not None:
            answered = rollout.prompts
        if rollout is None or answered is not batch:
            raise RuntimeError(
                "no rollout for this batch: add cppo_lightning.callbacks.RolloutCallback to the "
                "trainer's callbacks (the `cppo` CLI adds it, configured under `rollout:`)."
            )
        return rollout

    @property
    def pending_rollout(self) -> RolloutBatch | None:
        """The rollout batch the next training step will learn from (set by ``set_rollout``)."""
        return self._rollout

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through should_stop makes Lightning validate after the last step, so the run
        # always ends with a held-out measurement.
        if self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the trainable state only: the frozen reference and frozen base weights are
        # reloaded from model_name_or_path.
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        # Every rank's generators (a collective: Lightning builds the checkpoint on every rank).
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable weights of this model "
                f"(e.g. {missing[:3]}): it was written with another model or LoRA setting; "
                "resume with the same model_name_or_path and lora as the run that wrote it."
            )
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Last: building the model above may draw (LoRA's initialisation).
            restore_rng_states(
                checkpoint.get("rng_states"), self.global_rank, self.trainer.world_size
            )

    def _trainable_keys(self) -> set[str]:
        assert self.policy is not None, "configure_model() has not run"
        names = set()
        for name, parameter in self.policy.named_parameters():
            if parameter.requires_grad:
                for prefix in _WRAPPER_PREFIXES:  # state-dict keys carry no wrapper names
                    name = name.replace(prefix, "")
                names.add(f"policy.{name}")
        return names

    def save_pretrained(self, directory: str) -> None:
        """Write the policy (LoRA merged) and its processor as a standalone Hugging Face
        checkpoint: ``from_pretrained`` loads it without this package."""
        assert self.policy is not None
        policy = self.policy
        if self.lora is not None:
            policy = copy.deepcopy(policy).merge_and_unload()  # type: ignore[operator]
        policy.save_pretrained(directory)  # type: ignore[operator]
        save_processor(self.processor, directory)
