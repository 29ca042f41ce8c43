"""What the perception objective is doing: detection precision against baselines, panels."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.detection import TokenSelector
from cppo_lightning.module import CPPOModule
from cppo_lightning.records import UpdateRecord

#: The detection budgets ``rho`` (top fraction of the entropy-raising tokens) reported beside the
#: configured one.
RHOS = (0.1, 0.25, 0.5)


def perception_word_labels(
    tokenizer: Any,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    words: Sequence[list],
    end_of_reasoning: str | None = "</think>",
) -> torch.Tensor:
    """``[N, L]`` True on response tokens that overlap one of the response's perception words.

    Only the reasoning counts: words after ``end_of_reasoning`` (the boxed answer, which repeats
    what the reasoning found, not something read from the image again) are not labelled. A
    response without it is labelled throughout.

    Args:
        tokenizer: Decodes single tokens (their concatenation must give the response text).
        response_ids: ``[N, L]``.
        response_mask: ``[N, L]``.
        words: N lists of words (whole-word, case-insensitive matches in the response).
        end_of_reasoning: The text that ends the reasoning, or None to label everywhere.
    """
    labels = torch.zeros(response_ids.shape, dtype=torch.bool)
    lengths = response_mask.sum(1).tolist()
    for row, (ids, length, row_words) in enumerate(
        zip(response_ids.tolist(), lengths, words, strict=True)
    ):
        pieces = tokenizer.batch_decode([[t] for t in ids[: int(length)]])
        text = "".join(pieces)
        limit = text.find(end_of_reasoning) if end_of_reasoning else -1
        if limit >= 0:
            text = text[:limit]
        spans = [
            match.span()
            for word in {str(w) for w in row_words if str(w).strip()}
            for match in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE)
        ]
        start = 0
        for col, piece in enumerate(pieces):
            end = start + len(piece)
            if any(a < end and start < b for a, b in spans):
                labels[row, col] = True
            start = end
    return labels


def detection_counts(
    selected: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor
) -> torch.Tensor:
    """``[4]`` float: selected labelled tokens, selected tokens, labelled tokens of the pool, pool
    tokens (sums, so that ranks can add them)."""
    selected, labels, pool = selected.bool().cpu(), labels.bool().cpu(), pool.bool().cpu()
    return torch.stack(
        [(selected & labels).sum(), selected.sum(), (pool & labels).sum(), pool.sum()]
    ).float()


def top_entropy_tokens(
    entropy: torch.Tensor, pool: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """``[N, L]`` bool: per response, the ``budget[r]`` pool tokens of highest ``entropy``.

    The high-entropy baseline of detection: the tokens a model is least sure of under the
    original image, without looking at any other view.
    """
    scores = entropy.float().masked_fill(~pool, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return (ranks < budget[:, None]) & pool


def baseline_counts(
    selected: torch.Tensor,
    labels: torch.Tensor,
    pool: torch.Tensor,
    entropy: torch.Tensor,
    entropy_removed: torch.Tensor,
    selector: TokenSelector,
) -> dict[str, torch.Tensor]:
    """Labelled and chosen token counts of detection's baselines (``[2]`` float each).

    With the budget of tokens per response that detection used:

    - ``random``: uniformly random pool tokens; the exact expectation
      ``sum_r k_r * labelled_r / pool_r`` is returned, so no random draw adds noise;
    - ``entropy``: the tokens of highest entropy under the original image
      (:func:`top_entropy_tokens`).

    And detection itself at each ``rho`` of :data:`RHOS` (``rho0.1``, ...), with the selector's
    other options but always the entropy-shift ranking: under the ``entropy`` and ``random``
    ablations these still report the paper's detection, and no random draw moves the run's RNG.
    """
    selected, labels, pool = selected.bool().cpu(), labels.bool().cpu(), pool.bool().cpu()
    entropy, entropy_removed = entropy.float().cpu(), entropy_removed.float().cpu()
    budget = (selected & pool).sum(1)  # [N]
    labelled, size = (labels & pool).sum(1), pool.sum(1).clamp(min=1)
    counts = {"random": torch.stack([(budget * labelled / size).sum(), budget.sum()]).float()}
    chosen = {"entropy": top_entropy_tokens(entropy, pool, budget)}
    for rho in RHOS:
        at = dataclasses.replace(
            selector, top_fraction=rho, top_k=None, gate_advantages=False, ranking="entropy-shift"
        )
        chosen[f"rho{rho}"] = at(entropy, entropy_removed, pool.to(entropy.dtype)) & pool
    for name, mask in chosen.items():
        counts[name] = torch.stack([(mask & labels).sum(), mask.sum()]).float()
    return counts


def detection_precision(
    selected: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor
) -> tuple[float, float]:
    """(precision of the selected tokens, base rate of labelled tokens in the candidate pool)."""
    hits, chosen, labelled, candidates = detection_counts(selected, labels, pool).tolist()
    return hits / max(chosen, 1.0), labelled / max(candidates, 1.0)


class PerceptionMonitor(pl.Callback):
    """Logs how well detection finds perception words, and panels of views and responses.

    Every step, when the dataset has a ``words_column`` (the synthetic task's ground-truth
    perception words, labelled inside the reasoning by :func:`perception_word_labels`):
    ``perception/precision`` (share of selected tokens inside a perception word) and
    ``perception/base_rate`` (share of tokens inside one among all tokens detection chose from,
    i.e. the responses that passed the gate); and, where the objective reports the entropies it
    scored, the precision of baselines with the same budget of tokens per response,
    ``perception/precision_random`` and ``perception/precision_entropy`` (highest entropy under
    the original image), and of detection at other budgets, ``perception/precision_rho0.1``,
    ``..._rho0.25`` and ``..._rho0.5`` (:func:`baseline_counts`). Every ``every_n_steps`` steps, to
    TensorBoard: original | preserving | removing images of ``num_prompts`` prompts, and their
    first responses with the selected tokens in ``[[...]]``. Does nothing for what a run does
    not produce (no views under GRPO, no selected tokens under PAPO). Data without
    ``words_column`` (any data but the synthetic task's, unless it labels its own) gets the
    panels and no precision, and the run's log says so once.

    Args:
        every_n_steps: Rollout batches between panels; 0 disables panels.
        num_prompts: Prompts shown per panel.
        words_column: Dataset column with each prompt's perception words.
    """

    def __init__(
        self, every_n_steps: int = 50, num_prompts: int = 4, words_column: str = "perception_words"
    ) -> None:
        if every_n_steps < 0 or num_prompts < 1:
            raise ValueError(
                f"every_n_steps must be >= 0 and num_prompts >= 1, got {every_n_steps} and "
                f"{num_prompts}."
            )
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.words_column = words_column
        self._batches = 0
        self._told_no_words = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(pl_module, CPPOModule) or pl_module.last_update is None:
            return
        record = pl_module.last_update
        step, self._batches = self._batches, self._batches + 1
        rollout = record.rollout
        labels = None
        words = rollout.prompts.columns.get(self.words_column)
        if record.perception_mask is not None and words is None and not self._told_no_words:
            self._told_no_words = True
            rank_zero_info(
                f"PerceptionMonitor: the training data has no {self.words_column!r} column, so "
                "perception/precision and its baselines are not logged (the synthetic task "
                "labels the words that state image facts; other data does not); the image and "
                "response panels are still written."
            )
        if record.perception_mask is not None and words is not None:
            per_response = [words[int(i)] for i in rollout.prompt_index.tolist()]
            labels = perception_word_labels(
                pl_module.processor.tokenizer,
                rollout.response_ids,
                rollout.response_mask,
                per_response,
            )
            pool = rollout.response_mask.bool().cpu()
            selector = pl_module.token_selector
            if selector is not None and selector.gate_advantages:
                assert rollout.advantages is not None
                pool &= (rollout.advantages > 0).cpu()[:, None]
            parts = [detection_counts(record.perception_mask, labels, pool)]
            baselines: dict[str, torch.Tensor] = {}
            if record.entropy is not None and record.entropy_removed is not None:
                assert selector is not None
                baselines = baseline_counts(
                    record.perception_mask,
                    labels,
                    pool,
                    record.entropy,
                    record.entropy_removed,
                    selector,
                )
                parts += list(baselines.values())
            # Summed over ranks on every rank (a collective must not depend on the data), then
            # logged where something was selected anywhere.
            counts = trainer.strategy.reduce(torch.cat(parts).to(pl_module.device), reduce_op="sum")
            hits, chosen, labelled, candidates = counts[:4]
            if chosen > 0:
                metrics = {
                    "perception/precision": float(hits / chosen),
                    "perception/base_rate": float(labelled / candidates.clamp(min=1)),
                }
                for i, name in enumerate(baselines):
                    hit, size = counts[4 + 2 * i : 6 + 2 * i]
                    metrics[f"perception/precision_{name}"] = float(hit / size.clamp(min=1))
                pl_module.log_dict(metrics, batch_size=rollout.num_responses)
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    self._panels(logger, pl_module, record, trainer.global_step)

    def _panels(
        self, logger: TensorBoardLogger, module: CPPOModule, record: UpdateRecord, step: int
    ) -> None:
        rollout = record.rollout
        prompts = rollout.prompts
        shown = min(self.num_prompts, prompts.num_prompts)
        if prompts.images is not None and prompts.views is not None:
            for b in range(shown):
                first = prompts.first_image(b)  # the prompt's first image if it has several
                row = [prompts.images[first]]
                for view in (prompts.views.preserving, prompts.views.removing):
                    if view is not None:
                        row.append(view[first])
                panel = torch.cat([image.detach().float().cpu() for image in row], dim=2)
                logger.experiment.add_image(f"perception/views/{b}", panel.clamp(0, 1), step)
        lines = []
        tokenizer = module.processor.tokenizer
        for b in range(shown):
            response = b * rollout.group_size
            length = int(rollout.response_mask[response].sum())
            ids = rollout.response_ids[response, :length].tolist()
            pieces = tokenizer.batch_decode([[t] for t in ids])
            marks = (
                record.perception_mask[response, :length].tolist()
                if record.perception_mask is not None
                else [False] * length
            )
            text = "".join(f"[[{p}]]" if m else p for p, m in zip(pieces, marks, strict=True))
            advantage = float(rollout.advantages[response]) if rollout.advantages is not None else 0
            question = prompts.columns.get("question", [""] * prompts.num_prompts)[b]
            lines.append(
                f"    Q: {question}\n    reward {float(rollout.rewards[response]):.2f}, "
                f"advantage {advantage:+.2f}\n    {text}\n"
            )
        logger.experiment.add_text("perception/responses", "\n".join(lines), step)
