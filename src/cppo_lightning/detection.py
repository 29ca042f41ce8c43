"""Perception-token detection by entropy shift (docs/method.md §2) as pure tensor functions.

A response token is *perception-dependent* when destroying the task-relevant image content (the
information-removing view I-) makes the policy markedly less sure of the next token. With ``H`` the
full-vocabulary entropy of the next-token distribution given the original image I and ``H-`` the
same given I-, the per-token shift is ``dH = H- - H``; the normalised score
``relu(dH) / (H- + 1e-6)`` lies in [0, 1). Per response, the top fraction of the tokens whose
entropy rises is kept, and with advantage gating only responses with a positive advantage keep
any. The pieces compose as::

    H = token_entropy(logits, temperature)                          # [N, L]
    H_neg = token_entropy(logits_neg, temperature)                  # [N, L]
    selected = perception_token_mask(H, H_neg, response_mask, advantages=adv)  # bool [N, L]

CPPO's own ablations keep that per-response budget and change only the ranking
(``ranking="entropy"``: highest ``H``; ``ranking="random"``: uniformly at random); their math is in
:mod:`cppo_lightning.rankings`.

No trainer, config or model objects appear; :class:`TokenSelector` bundles the options so that
the selection rule can be injected as one constructor argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cppo_lightning.rankings import (
    RANKINGS,
    check_ranking,
    highest_entropy_mask,
    random_token_mask,
)

__all__ = [
    "RANKINGS",
    "SCORES",
    "TokenSelector",
    "entropy_shift_score",
    "perception_token_mask",
    "token_entropy",
]

SCORES = ("normalized", "raw")

# floor(top_fraction * n) is taken with this much slack so that products that are integers in
# exact arithmetic but land just below one in binary floating point (0.29 * 100 = 28.999...)
# still give that integer. Far below 1 / n for any realistic response length.
_FLOOR_SLACK = 1e-9


def token_entropy(logits: Tensor, temperature: float = 1.0, *, chunk_size: int = 4096) -> Tensor:
    """Full-vocabulary entropy of ``softmax(logits / temperature)`` at every token position.

    ``H = -sum_v p_v log p_v``, computed from ``log_softmax`` in at least float32 (float64 inputs
    stay float64). The ``N * L`` positions are processed in slices of at most ``chunk_size``
    (whole responses when they fit, else pieces of one response; all views, no copy), so the
    float32 temporaries of a whole ``[N, L, V]`` tensor (several GiB for a 150k vocabulary
    and a long response) never exist at once: under ``torch.no_grad()`` the extra memory is one
    chunk's worth. With autograd on, each chunk's graph keeps its own temporaries, as any
    differentiable entropy must (PAPO's double-entropy term needs those gradients).

    Vocabulary entries with logit ``-inf`` (masked tokens) have ``p = 0`` and contribute exactly
    0; their ``0 * log 0`` is replaced by 0 with ``torch.where`` before any product, so neither the
    value nor the gradient becomes NaN.

    Args:
        logits: Next-token logits at each response position (any float dtype, e.g. bf16).
        temperature: The sampling temperature the logits are divided by; > 0.
        chunk_size: Most token positions handled at once; >= 1. Smaller bounds memory tighter.

    Returns:
        The entropy in nats at each position, in float32 (float64 if ``logits`` is float64).
        Positions whose logits are all ``-inf`` give NaN; mask such padding downstream.

    Raises:
        ValueError: If ``logits`` is not 3-D, ``temperature`` is not positive and finite, or
            ``chunk_size`` is not a positive int.

    Shape:
        - logits: ``[N, L, V]``.
        - output: ``[N, L]``.
    """
    if logits.dim() != 3:
        raise ValueError(
            f"logits must be [N, L, V] (responses, tokens, vocabulary), got shape "
            f"{tuple(logits.shape)}; add the missing batch dimension with unsqueeze(0)."
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(
            f"temperature must be a finite number > 0 (the sampling temperature, 1.0 in the "
            f"recipe), got {temperature!r}."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")

    n, length, _ = logits.shape
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if n * length == 0:
        return logits.new_zeros((n, length), dtype=compute_dtype)

    # Chunks are slices of the 3-D tensor, i.e. views: flattening to [N * L, V] first would copy
    # all of it when the logits are a non-contiguous slice of the model output.
    if length <= chunk_size:
        step = chunk_size // length  # whole responses per chunk
        pieces = [
            _chunk_entropy(logits[start : start + step], temperature, compute_dtype)
            for start in range(0, n, step)
        ]
        return torch.cat(pieces, dim=0)  # [N, L]
    rows = [
        torch.cat(
            [
                _chunk_entropy(logits[row, start : start + chunk_size], temperature, compute_dtype)
                for start in range(0, length, chunk_size)
            ]
        )
        for row in range(n)
    ]
    return torch.stack(rows)  # [N, L]


def _chunk_entropy(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """Entropy over the last dimension of one chunk, in ``dtype``; shape ``[..., V] -> [...]``."""
    scaled = logits.to(dtype) / temperature  # [..., V]
    logp = torch.log_softmax(scaled, dim=-1)  # [..., V]
    p = logp.exp()  # [..., V]
    # p = 0 entries (logit -inf, or underflow) contribute 0: zero log p first, so that neither
    # 0 * -inf in the forward nor -inf * 0 in the backward appears.
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))  # [..., V]
    return -(p * safe_logp).sum(dim=-1)  # [...]


def _check_pair(entropy: Tensor, entropy_removed: Tensor) -> None:
    if entropy.dim() != 2 or entropy.shape != entropy_removed.shape:
        raise ValueError(
            f"entropy and entropy_removed must both be [N, L] with the same shape, got "
            f"{tuple(entropy.shape)} and {tuple(entropy_removed.shape)}; compute both on the "
            "same padded responses (only the image view differs)."
        )


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(
            f"score must be one of {SCORES} ('normalized' = relu(dH) / (H- + eps), the paper; "
            f"'raw' = dH), got {score!r}."
        )


def entropy_shift_score(
    entropy: Tensor,
    entropy_removed: Tensor,
    *,
    score: str = "normalized",
    eps: float = 1e-6,
) -> Tensor:
    """Per-token entropy shift caused by removing the task-relevant image content.

    With ``dH = H- - H``:

    - ``"normalized"`` (default, the paper): ``relu(dH) / (H- + eps)``, in [0, 1); the share of
      the uncertainty under I- that the original image resolves. Tokens whose entropy does not
      rise score 0.
    - ``"raw"``: ``dH`` itself (may be negative); favours tokens with large absolute shifts,
      i.e. high-entropy positions.

    Args:
        entropy: ``H``, the entropy given the original image I.
        entropy_removed: ``H-``, the entropy given the information-removing view I-.
        score: ``"normalized"`` or ``"raw"``.
        eps: Added to ``H-`` in the normalised score's denominator; >= 0.

    Returns:
        The score at each position (padding positions included; mask them downstream).

    Raises:
        ValueError: If the shapes differ or are not 2-D, ``score`` is unknown or ``eps`` < 0.

    Shape:
        - entropy, entropy_removed: ``[N, L]``.
        - output: ``[N, L]``.
    """
    _check_pair(entropy, entropy_removed)
    _check_score(score)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}.")
    shift = entropy_removed - entropy  # [N, L]
    if score == "raw":
        return shift
    return torch.relu(shift) / (entropy_removed + eps)  # [N, L]


def perception_token_mask(
    entropy: Tensor,
    entropy_removed: Tensor,
    mask: Tensor,
    *,
    top_fraction: float = 0.5,
    advantages: Tensor | None = None,
    score: str = "normalized",
    top_k: int | None = None,
    eps: float = 1e-6,
    ranking: str = "entropy-shift",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select the perception-dependent tokens of each response (docs/method.md §2).

    Per response (row), the candidates are its valid tokens (``mask != 0``) whose entropy rises,
    ``dH = H- - H > 0``; call their count ``n``. The candidates whose score (see
    :func:`entropy_shift_score`) is at least the k-th largest candidate score are kept, with
    ``k = max(1, floor(top_fraction * n))``, or ``k = min(top_k, n)`` when ``top_k`` is given.
    Ties at the threshold are all kept, so a row may keep more than ``k`` tokens. Rows with
    ``n = 0`` keep nothing; padding and prompt positions (``mask == 0``) are never kept, however
    large their shift. With ``advantages`` given (advantage gating), only tokens with ``A > 0`` are
    kept, i.e. whole responses with a positive advantage when ``A`` is per response.

    ``ranking`` (CPPO's ablations) keeps that budget and changes which tokens fill it: with
    ``c_r`` the number of tokens the entropy-shift rule above keeps in row r (its ``k`` plus any
    ties), ``"entropy"`` keeps the ``c_r`` valid tokens of highest ``H`` (ties at the threshold
    kept; :func:`~cppo_lightning.rankings.highest_entropy_mask`) and ``"random"`` exactly ``c_r``
    valid tokens chosen uniformly at random (:func:`~cppo_lightning.rankings.random_token_mask`,
    drawn from ``generator``, or torch's global generator of the tensors' device when None).
    Either may pick tokens whose entropy does not rise; a row where the shift rule keeps nothing
    keeps nothing. Gating applies to every ranking.

    Vectorised: one sort per row, no Python loop over rows. Computed without gradient.

    Args:
        entropy: ``H``, the entropy given the original image I.
        entropy_removed: ``H-``, the entropy given the information-removing view I-.
        mask: Response mask; non-zero (or True) marks a real response token.
        top_fraction: ``rho``, the fraction of each response's candidates to keep; in (0, 1].
            Ignored when ``top_k`` is given.
        advantages: One advantage per response, or per token (broadcast over the row); None
            disables gating.
        score: ``"normalized"`` (default) or ``"raw"``; see :func:`entropy_shift_score`.
        top_k: An absolute number of tokens per response (>= 1) instead of a fraction.
        eps: The normalised score's ``eps``.
        ranking: ``"entropy-shift"`` (default, the paper), ``"entropy"`` or ``"random"``.
        generator: Draws the ``"random"`` ranking's tokens; None uses torch's global generator
            (saved in checkpoints, so a resumed run draws the same). Unused by other rankings.

    Returns:
        A bool tensor, True at the selected tokens; it does not require grad.

    Raises:
        ValueError: On mismatched shapes or out-of-range options; see the messages.

    Shape:
        - entropy, entropy_removed, mask: ``[N, L]``.
        - advantages: ``[N]`` or ``[N, L]``.
        - output: ``[N, L]``, dtype bool.
    """
    _check_pair(entropy, entropy_removed)
    if mask.shape != entropy.shape:
        raise ValueError(
            f"mask must be [N, L] like entropy {tuple(entropy.shape)}, got {tuple(mask.shape)}; "
            "pass the response mask of the same padded responses."
        )
    _check_score(score)
    check_ranking(ranking)
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(
            f"top_fraction must be in (0, 1] (the recipe uses 0.5), got {top_fraction!r}; use "
            "top_k= for an absolute number of tokens."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(
            f"top_k must be an int >= 1 or None, got {top_k!r}; pass None to select by "
            "top_fraction instead."
        )
    if advantages is not None and advantages.shape not in (entropy.shape[:1], entropy.shape):
        raise ValueError(
            f"advantages must be [N] (one per response) or [N, L] (one per token) with "
            f"[N, L] = {tuple(entropy.shape)}, got {tuple(advantages.shape)}."
        )

    with torch.no_grad():
        entropy, entropy_removed = entropy.detach(), entropy_removed.detach()
        shift = entropy_removed - entropy  # [N, L]
        scores = entropy_shift_score(entropy, entropy_removed, score=score, eps=eps)  # [N, L]
        candidate = mask.detach().bool() & (shift > 0)  # [N, L]; NaN shifts are never > 0
        count = candidate.sum(dim=1)  # [N]

        if top_k is None:
            k = torch.floor(count.double() * top_fraction + _FLOOR_SLACK).long()  # [N]
            k = k.clamp(min=1)
        else:
            k = torch.full_like(count, top_k)  # [N]
        k = torch.minimum(k, count)  # [N]; 0 exactly where a row has no candidate

        # Non-candidates sort last; the k-th largest candidate score is the row's threshold.
        ranked = torch.where(candidate, scores, torch.full_like(scores, -math.inf))  # [N, L]
        ordered = ranked.sort(dim=1, descending=True).values  # [N, L]
        threshold = ordered.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [N, 1]
        selected = candidate & (ranked >= threshold) & (k > 0).unsqueeze(1)  # [N, L]

        if ranking != "entropy-shift":
            # The ablations keep the shift rule's budget per response: only the ranking differs.
            budget = selected.sum(dim=1)  # [N]
            if ranking == "entropy":
                selected = highest_entropy_mask(entropy, mask, budget)  # [N, L]
            else:
                selected = random_token_mask(mask, budget, generator=generator)  # [N, L]

        if advantages is not None:
            adv = advantages.detach()
            positive = (adv > 0).unsqueeze(1) if adv.dim() == 1 else adv > 0  # [N, 1] / [N, L]
            selected = selected & positive  # [N, L]
    return selected


@dataclass(frozen=True)
class TokenSelector:
    """The perception-token selection rule as one injectable, validated value (docs/method.md §2).

    Calling it applies :func:`perception_token_mask` with these options, passing the advantages
    only when ``gate_advantages`` is on. The ``"random"`` ranking draws from torch's global
    generator (deterministic under ``seed_everything``, restored on resume).

    Attributes:
        top_fraction: ``rho``, the fraction of each response's entropy-raising tokens to keep;
            in (0, 1]. Ignored when ``top_k`` is set.
        score: ``"normalized"`` (``relu(dH) / (H- + eps)``, the paper) or ``"raw"`` (``dH``).
        top_k: An absolute number of tokens per response instead of a fraction; None (default)
            uses ``top_fraction``.
        gate_advantages: Keep only tokens of responses with a positive advantage (the paper).
        ranking: Which tokens fill each response's budget: ``"entropy-shift"`` (the paper),
            ``"entropy"`` (highest entropy under the original image) or ``"random"``; the
            budget is always the entropy-shift rule's. See :func:`perception_token_mask`.
    """

    top_fraction: float = 0.5
    score: str = "normalized"
    top_k: int | None = None
    gate_advantages: bool = True
    ranking: str = "entropy-shift"

    def __post_init__(self) -> None:
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(
                f"top_fraction must be in (0, 1] (the recipe uses 0.5), got "
                f"{self.top_fraction!r}; use top_k= for an absolute number of tokens."
            )
        _check_score(self.score)
        top_k = self.top_k
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(
                f"top_k must be an int >= 1 or None, got {top_k!r}; pass None to select by "
                "top_fraction instead."
            )
        if not isinstance(self.gate_advantages, bool):
            raise ValueError(
                f"gate_advantages must be True or False, got {self.gate_advantages!r}."
            )
        check_ranking(self.ranking)

    def __call__(
        self,
        entropy: Tensor,
        entropy_removed: Tensor,
        mask: Tensor,
        advantages: Tensor | None = None,
    ) -> Tensor:
        """Select the perception tokens; see :func:`perception_token_mask`.

        Args:
            entropy: ``H``, the entropy given the original image.
            entropy_removed: ``H-``, the entropy given the information-removing view.
            mask: Response mask; non-zero marks a real response token.
            advantages: Per-response (or per-token) advantages; required when
                ``gate_advantages`` is on, ignored when it is off.

        Returns:
            The bool selection mask.

        Raises:
            ValueError: If gating is on and ``advantages`` is None, or on bad inputs.

        Shape:
            - entropy, entropy_removed, mask: ``[N, L]``; advantages: ``[N]`` or ``[N, L]``.
            - output: ``[N, L]``, dtype bool.
        """
        if self.gate_advantages and advantages is None:
            raise ValueError(
                "TokenSelector(gate_advantages=True) needs advantages to gate on; pass them, or "
                "build the selector with gate_advantages=False to select in every response."
            )
        return perception_token_mask(
            entropy,
            entropy_removed,
            mask,
            top_fraction=self.top_fraction,
            advantages=advantages if self.gate_advantages else None,
            score=self.score,
            top_k=self.top_k,
            ranking=self.ranking,
        )
