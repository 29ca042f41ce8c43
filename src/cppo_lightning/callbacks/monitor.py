"""What the perception objective is doing: detection precision, image and text panels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from cppo_lightning.module import CPPOModule
from cppo_lightning.records import UpdateRecord


def perception_word_labels(
    tokenizer: Any, response_ids: torch.Tensor, response_mask: torch.Tensor, words: Sequence[list]
) -> torch.Tensor:
    """``[N, L]`` True on response tokens that overlap one of the response's perception words.

    Args:
        tokenizer: Decodes single tokens (their concatenation must give the response text).
        response_ids: ``[N, L]``.
        response_mask: ``[N, L]``.
        words: N lists of words (whole-word, case-insensitive matches in the response).
    """
    labels = torch.zeros(response_ids.shape, dtype=torch.bool)
    lengths = response_mask.sum(1).tolist()
    for row, (ids, length, row_words) in enumerate(
        zip(response_ids.tolist(), lengths, words, strict=True)
    ):
        pieces = tokenizer.batch_decode([[t] for t in ids[: int(length)]])
        text = "".join(pieces)
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


def detection_precision(
    selected: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor
) -> tuple[float, float]:
    """(precision of the selected tokens, base rate of labelled tokens in the candidate pool)."""
    hits, chosen, labelled, candidates = detection_counts(selected, labels, pool).tolist()
    return hits / max(chosen, 1.0), labelled / max(candidates, 1.0)


class PerceptionMonitor(pl.Callback):
    """Logs how well detection finds perception words, and panels of views and responses.

    Every step, when the dataset has a ``words_column`` (the synthetic task's ground-truth
    perception words): ``perception/precision`` (share of selected tokens inside a perception
    word) and ``perception/base_rate`` (share of tokens inside one among all tokens detection
    chose from, i.e. the responses that passed the gate). Every ``every_n_steps`` steps, to
    TensorBoard: original | preserving | removing images of ``num_prompts`` prompts, and their
    first responses with the selected tokens in ``[[...]]``. Does nothing for what a run does
    not produce (no views under GRPO, no selected tokens under PAPO).

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
            counts = detection_counts(record.perception_mask, labels, pool).to(pl_module.device)
            # Summed over ranks on every rank (a collective must not depend on the data), then
            # logged where something was selected anywhere.
            hits, chosen, labelled, candidates = trainer.strategy.reduce(counts, reduce_op="sum")
            if chosen > 0:
                pl_module.log_dict(
                    {
                        "perception/precision": float(hits / chosen),
                        "perception/base_rate": float(labelled / candidates.clamp(min=1)),
                    },
                    batch_size=rollout.num_responses,
                )
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
