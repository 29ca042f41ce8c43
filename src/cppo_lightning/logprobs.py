"""The one log-prob path: response hidden states -> LM head, chunk by chunk, never ``[n, L, V]``.

Every score of a response token goes through here: the policy's log-probs in the loss, the old
and reference log-probs, the log-probs under the I+ / I- views, the entropies of detection and
PAPO's entropy terms, and the CPL's exact full-vocabulary KL between views (``divergence: kl``).
The backbone runs once per (model, view) and returns the final hidden states ``[n, L, H]`` (H is
the hidden size, e.g. 2,048 for a 3B model, against a vocabulary V of 151,936). The LM head is
then applied to at most ``chunk_tokens`` positions at a time, in float32, and only ``[n, L]``
results are kept: the sampled token's ``gather - logsumexp`` and, on request, the
full-vocabulary entropy. When gradients are needed and there is more than one chunk, each chunk
is checkpointed (``torch.utils.checkpoint``, non-reentrant): its logits are recomputed in the
backward instead of being held from the forward, as TRL's chunked LM head and verl's fused
linear-for-PPO kernels do.

Data flow::

    model.model(prompt + response, view) -> hidden [n, P + L, H] -> hidden[:, P-1 : P+L-1]
        -> chunks of c positions: head(h) / T -> [c, V] float32 -> logp [c], entropy [c]
        -> logp [n, L], entropy [n, L]

The exact KL of the CPL (:meth:`ResponseScores.kl_to`) is chunked the same way, over the S
selected positions of the three views: each chunk of c positions builds the views' ``[c, V]``
log-softmax, reduces them to ``KL(pi(.|I) || pi(.|I+))`` and ``KL(pi(.|I) || pi(.|I-))`` ``[c]``
(:func:`cppo_lightning.losses.cpl.full_kl`) and is recomputed in the backward; only ``[S]``
results are kept::

    hidden[mask] of I, I+, I- [S, H] each -> chunks of c positions -> 3 x [c, V] -> KL [c], [c]
        -> d_pos [S], d_neg [S]

The sampler's suppressed tokens (vision placeholders, which ``generate`` never emits) are
masked out of the head's distribution too, so the training log-probs describe exactly the
distribution the responses were sampled from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cppo_lightning.detection import _chunk_entropy
from cppo_lightning.losses.cpl import full_kl
from cppo_lightning.records import PromptBatch

__all__ = [
    "DEFAULT_LOGIT_BUDGET",
    "ResponseScores",
    "Scoring",
    "chunk_positions",
    "head_scores",
    "lm_head",
    "response_hidden",
    "score_responses",
    "selected_kl",
]

#: Most logits (positions x vocabulary) one chunk materialises when ``chunk_tokens`` is unset:
#: 2**26 float32 values, 256 MiB; 441 positions at Qwen2.5-VL's vocabulary of 151,936.
DEFAULT_LOGIT_BUDGET = 2**26


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output projection (hidden -> vocabulary logits) of a policy or reference."""
    head = _unwrap(model).get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head).")
    return head


def response_hidden(
    model: torch.nn.Module,
    prompts: PromptBatch,
    prompt_index: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    vision: dict[str, Tensor] | None = None,
) -> Tensor:
    """Final hidden states at the positions that predict each response token.

    The backbone (``model.model`` of every supported ``*ForConditionalGeneration``) is called
    instead of the full model, so that no logits are computed here at all.

    Args:
        model: The policy or the reference (peft-wrapped or not).
        prompts: The B prompts of the rollout batch.
        prompt_index: ``[n]`` the prompt of each of the n responses.
        response_ids: ``[n, L]``.
        response_mask: ``[n, L]``.
        vision: Replacement image tensors for the B prompts (another view, same shapes); the
            prompts' own when None.

    Returns:
        ``[n, L, H]``: position j predicts ``response_ids[:, j]``.
    """
    prompt_length = prompts.input_ids.shape[1]
    length = response_ids.shape[1]
    inputs: dict[str, Any] = {
        "input_ids": torch.cat([prompts.input_ids[prompt_index], response_ids], dim=1),
        "attention_mask": torch.cat(
            [prompts.attention_mask[prompt_index], response_mask.to(prompts.attention_mask.dtype)],
            dim=1,
        ),
        **prompts.select_vision(prompt_index, vision),
        "use_cache": False,
    }
    if prompts.mm_token_type_ids is not None:
        # Without it Qwen-VL's M-RoPE positions are silently wrong over prompt + response.
        inputs["mm_token_type_ids"] = torch.cat(
            [prompts.mm_token_type_ids[prompt_index], torch.zeros_like(response_ids)], dim=1
        )
    backbone = _unwrap(model).model  # type: ignore[union-attr]
    hidden = backbone(**inputs)[0]  # type: ignore[operator]  # [n, P + L, H]
    return hidden[:, prompt_length - 1 : prompt_length - 1 + length]  # [n, L, H]


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How hidden states become token distributions, the same for every forward of a run.

    Attributes:
        temperature: The sampling temperature; distributions are ``softmax(logits / T)``.
        suppressed_ids: Vocabulary ids the sampler never emits; their probability is 0 here too.
        chunk_tokens: Most positions per LM-head chunk; None sizes chunks to
            :data:`DEFAULT_LOGIT_BUDGET` logits.
    """

    temperature: float = 1.0
    suppressed_ids: tuple[int, ...] = ()
    chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"the scoring temperature must be > 0, got {self.temperature}.")
        if self.chunk_tokens is not None and (
            isinstance(self.chunk_tokens, bool)
            or not isinstance(self.chunk_tokens, int)
            or self.chunk_tokens < 1
        ):
            raise ValueError(
                "model.logprob_chunk_tokens must be an int >= 1 or null, got "
                f"{self.chunk_tokens!r}."
            )


def chunk_positions(vocab_size: int, chunk_tokens: int | None = None) -> int:
    """Positions per LM-head chunk: ``chunk_tokens``, or as many as fit the default budget."""
    if chunk_tokens is not None:
        return chunk_tokens
    return max(1, DEFAULT_LOGIT_BUDGET // max(vocab_size, 1))


def _suppressed(scoring: Scoring, device: torch.device) -> Tensor | None:
    """The suppressed ids as a long tensor on ``device``; None when there are none."""
    if not scoring.suppressed_ids:
        return None
    return torch.tensor(scoring.suppressed_ids, device=device, dtype=torch.long)


def _vocab_size(head: torch.nn.Module) -> int:
    return int(getattr(head, "out_features", None) or head.weight.shape[0])  # type: ignore[index]


def _logits(
    head: torch.nn.Module, hidden: Tensor, temperature: float, suppressed: Tensor | None
) -> Tensor:
    """``head(hidden) / T`` in at least float32, suppressed ids at -inf; ``[c, H] -> [c, V]``."""
    logits = head(hidden)  # [c, V] in the weights' dtype
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [c, V]
    if suppressed is not None:
        logits = logits.index_fill(-1, suppressed, float("-inf"))
    return logits


def _chunk(
    head: torch.nn.Module,
    hidden: Tensor,
    ids: Tensor,
    temperature: float,
    suppressed: Tensor | None,
    entropy: str | None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of ``ids`` and (optionally) entropy at ``c`` positions; ``[c, H] -> [c]``."""
    logits = _logits(head, hidden, temperature, suppressed)  # [c, V]
    dtype = logits.dtype
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [c]
    logp = picked - torch.logsumexp(logits, dim=-1)  # [c]
    if entropy is None:
        return logp, None
    source = logits if entropy == "grad" else logits.detach()
    return logp, _chunk_entropy(source, 1.0, dtype)  # [c]


def head_scores(
    head: torch.nn.Module,
    hidden: Tensor,
    token_ids: Tensor,
    scoring: Scoring,
    *,
    entropy: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``token_ids`` and optionally entropies, chunk by chunk over positions.

    Args:
        head: The LM head (``[..., H] -> [..., V]``).
        hidden: ``[n, L, H]`` hidden states (:func:`response_hidden`).
        token_ids: ``[n, L]`` the tokens to score.
        scoring: Temperature, suppressed ids and chunk size.
        entropy: None (log-probs only), ``"detached"`` (entropies without a graph, for
            detection and monitors) or ``"grad"`` (entropies with a graph, PAPO's full
            entropy term).

    Returns:
        ``(logp [n, L], entropy [n, L] or None)`` in float32 (float64 for float64 weights).
        ``logp`` carries a graph when ``hidden`` does and gradients are enabled.
    """
    if entropy not in (None, "detached", "grad"):
        raise ValueError(f"entropy must be None, 'detached' or 'grad', got {entropy!r}.")
    n, length, size = hidden.shape
    flat_hidden = hidden.reshape(n * length, size)  # [n * L, H]
    flat_ids = token_ids.reshape(n * length)  # [n * L]
    step = chunk_positions(_vocab_size(head), scoring.chunk_tokens)
    suppressed = _suppressed(scoring, hidden.device)
    # Checkpoint only when it saves something: gradients wanted and more than one chunk.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and n * length > step
    logps, entropies = [], []
    for start in range(0, n * length, step):
        args = (
            head,
            flat_hidden[start : start + step],
            flat_ids[start : start + step],
            scoring.temperature,
            suppressed,
            entropy,
        )
        if recompute:
            logp, ent = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            logp, ent = _chunk(*args)
        logps.append(logp)
        entropies.append(ent)
    if not logps:  # no positions at all
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        empty = hidden.new_zeros((n, length), dtype=dtype)
        return empty, (empty.clone() if entropy else None)
    logp = torch.cat(logps).view(n, length)  # [n, L]
    if entropy is None:
        return logp, None
    return logp, torch.cat(entropies).view(n, length)  # type: ignore[arg-type]


def _kl_chunk(
    head: torch.nn.Module,
    temperature: float,
    suppressed: Tensor | None,
    detach_anchor: bool,
    anchor: Tensor,
    *others: Tensor,
) -> tuple[Tensor, ...]:
    """``KL(pi(.|anchor) || pi(.|other))`` at ``c`` positions for each other; ``[c, H] -> [c]``."""
    logp = torch.log_softmax(_logits(head, anchor, temperature, suppressed), dim=-1)  # [c, V]
    if detach_anchor:
        logp = logp.detach()
    return tuple(
        full_kl(logp, torch.log_softmax(_logits(head, other, temperature, suppressed), dim=-1))
        for other in others
    )  # [c] each


def selected_kl(
    head: torch.nn.Module,
    anchor: Tensor,
    others: tuple[Tensor, ...],
    scoring: Scoring,
    *,
    detach_anchor: bool = False,
) -> tuple[Tensor, ...]:
    """Exact full-vocabulary ``KL(pi(.|anchor) || pi(.|other))`` per position, chunk by chunk.

    The distributions are ``softmax(head(h) / T)`` with the suppressed ids at probability 0, as
    :meth:`ResponseScores.log_distribution` builds them; the head runs on at most
    ``chunk_positions(V, scoring.chunk_tokens)`` positions at a time and, when gradients are
    needed and there is more than one chunk, each chunk is checkpointed, so no ``[S, V]`` tensor
    exists in the forward or the backward.

    Args:
        head: The LM head (``[..., H] -> [..., V]``), shared by all views.
        anchor: ``[S, H]`` hidden states of the anchor view (the original image).
        others: ``[S, H]`` hidden states of each other view, at the same S positions.
        scoring: Temperature, suppressed ids and chunk size.
        detach_anchor: Cut the anchor's distribution from the graph (no gradient reaches
            ``anchor``, nor the head through it).

    Returns:
        One ``[S]`` KL per entry of ``others``, in float32 (float64 for float64 weights).

    Raises:
        ValueError: If the hidden states are not ``[S, H]`` of one shape.
    """
    if anchor.dim() != 2 or any(other.shape != anchor.shape for other in others):
        raise ValueError(
            "selected_kl needs [S, H] hidden states of one shape, got "
            f"{[tuple(t.shape) for t in (anchor, *others)]}."
        )
    positions = anchor.shape[0]
    step = chunk_positions(_vocab_size(head), scoring.chunk_tokens)
    suppressed = _suppressed(scoring, anchor.device)
    wants_grad = any(t.requires_grad for t in (anchor, *others)) or any(
        p.requires_grad for p in head.parameters()
    )
    # Checkpoint only when it saves something: gradients wanted and more than one chunk.
    recompute = torch.is_grad_enabled() and wants_grad and positions > step
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, positions, step):
        chunk = slice(start, start + step)
        views = tuple(other[chunk] for other in others)  # [c, H] each
        fixed = (head, scoring.temperature, suppressed, detach_anchor)
        if recompute:
            parts.append(checkpoint(_kl_chunk, *fixed, anchor[chunk], *views, use_reentrant=False))
        else:
            parts.append(_kl_chunk(*fixed, anchor[chunk], *views))
    if not parts:  # no positions at all
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        return tuple(anchor.new_zeros((0,), dtype=dtype) for _ in others)
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # [S] each


@dataclasses.dataclass(frozen=True)
class ResponseScores:
    """One forward's hidden states of n responses, and the head that scores them.

    Holding ``[n, L, H]`` instead of ``[n, L, V]`` logits is what keeps memory bounded: every
    score is computed from here on demand, chunk by chunk.

    Attributes:
        hidden: ``[n, L, H]`` (graph attached when it came from a training forward).
        head: The model's LM head.
        response_ids: ``[n, L]`` the sampled tokens.
        scoring: Temperature, suppressed ids and chunk size.
    """

    hidden: Tensor
    head: torch.nn.Module
    response_ids: Tensor
    scoring: Scoring

    def logps(self) -> Tensor:
        """``[n, L]`` log-probs of the sampled tokens (with the hidden states' graph)."""
        return head_scores(self.head, self.hidden, self.response_ids, self.scoring)[0]

    def logps_and_entropy(self, entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
        """``([n, L] log-probs, [n, L] entropies)``; entropies detached unless ``entropy_grad``."""
        logp, entropy = head_scores(
            self.head,
            self.hidden,
            self.response_ids,
            self.scoring,
            entropy="grad" if entropy_grad else "detached",
        )
        assert entropy is not None
        return logp, entropy

    @torch.no_grad()
    def entropy(self) -> Tensor:
        """``[n, L]`` full-vocabulary entropies, without a graph."""
        return self.logps_and_entropy()[1]

    def rows(self, rows: Tensor) -> ResponseScores:
        """The scores of responses ``rows`` only (indices into the n)."""
        return dataclasses.replace(
            self, hidden=self.hidden[rows], response_ids=self.response_ids[rows]
        )

    def log_distribution(self, mask: Tensor) -> Tensor:
        """``[S, V]`` float32 log-softmax at the S positions of ``mask`` (``[n, L]`` bool).

        Not chunked: all S rows of ``[S, V]`` exist at once, with their graph. For inspection
        and tests; a divergence between views is read with :meth:`kl_to`, chunk by chunk.
        """
        hidden = self.hidden[mask]  # [S, H]
        logits = _logits(
            self.head, hidden, self.scoring.temperature, _suppressed(self.scoring, hidden.device)
        )  # [S, V]
        return torch.log_softmax(logits, dim=-1)  # [S, V]

    def kl_to(
        self, others: tuple[ResponseScores, ...], mask: Tensor, *, detach_self: bool = False
    ) -> tuple[Tensor, ...]:
        """Exact ``KL(pi(.|self) || pi(.|other))`` at the S positions of ``mask``, per other.

        Chunk by chunk through the head (:func:`selected_kl`): at most
        ``chunk_positions(V, chunk_tokens)`` positions of ``[*, V]`` per view exist at once.

        Args:
            others: Forwards of the same responses under other views (same head and scoring).
            mask: ``[n, L]`` bool, the positions to compare.
            detach_self: Cut this forward's distribution from the graph.

        Returns:
            One ``[S]`` KL per entry of ``others``, with the hidden states' graph.

        Raises:
            ValueError: If another forward has a different head or scoring.
        """
        for other in others:
            if other.head is not self.head or other.scoring != self.scoring:
                raise ValueError(
                    "kl_to compares forwards of one model under one scoring; got another LM "
                    "head or Scoring."
                )
        return selected_kl(
            self.head,
            self.hidden[mask],  # [S, H]
            tuple(other.hidden[mask] for other in others),  # [S, H] each
            self.scoring,
            detach_anchor=detach_self,
        )


def score_responses(
    model: torch.nn.Module,
    prompts: PromptBatch,
    prompt_index: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    scoring: Scoring,
    vision: dict[str, Tensor] | None = None,
) -> ResponseScores:
    """Run ``model`` on prompts + responses (under ``vision`` when given) and return the
    :class:`ResponseScores` from which log-probs and entropies are read.

    Shape:
        prompt_index: ``[n]``; response_ids, response_mask: ``[n, L]``.
    """
    hidden = response_hidden(model, prompts, prompt_index, response_ids, response_mask, vision)
    return ResponseScores(hidden, lm_head(model), response_ids, scoring)
