"""GSPO (arXiv 2507.18071): the sequence-level importance ratio, at the ``model.policy_loss`` seam.

GRPO's surrogate weighs every token by its own ratio ``pi(y_t) / pi_old(y_t)``; GSPO weighs the
whole response by one ratio, the length-normalised likelihood ratio
``s_i = exp(mean_t(logp - old_logp))``, and clips it per response in a range two orders of
magnitude narrower. The math is :func:`cppo_lightning.losses.gspo.sequence_ratio_loss`; the overlay
``configs/experiments/gspo.yaml`` turns the method on.
"""

from __future__ import annotations

from torch import Tensor

from cppo_lightning.losses.grpo import check_clip_settings
from cppo_lightning.losses.gspo import sequence_ratio_loss
from cppo_lightning.seams import PolicyLoss


class SequenceRatio(PolicyLoss):
    """GSPO's surrogate: one ratio ``s_i = exp(mean_t(logp - old_logp))`` per response, clipped
    to ``[1 - clip_low, 1 + clip_high]``; ``token_level=True`` is GSPO-token
    (``s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: the value of ``s_i``, per-token advantages
    allowed, the same gradient as GSPO when advantages are per response).

    Defaults and where they come from (docs/methods-sources.md, "GSPO"):

    - ``clip_low = 3e-4``, ``clip_high = 4e-4``: the paper's §5.1, as cited by verl
      (``examples/gspo_trainer/test_gspo_3b_math.sh``, ``clip_ratio_low=0.0003``,
      ``clip_ratio_high=0.0004``) and TRL (``docs/source/paper_index.md``, ``epsilon=3e-4``,
      ``epsilon_high=4e-4``).
    - ``dual_clip = None``: neither the paper nor verl's ``compute_policy_loss_gspo`` applies one
      (the project's GRPO default is 3.0).
    - ``token_level = False``: the paper's GSPO; GSPO-token is the paper's variant for per-token
      advantages.

    The aggregation is the run's ``model.loss_agg``; the paper's objective (a mean over responses
    of each response's loss) is ``seq-mean-token-mean``, which verl forces for GSPO and the
    overlay sets. The ratio averages over every valid token of the ``mask`` the step passes:
    under a token weighting with ``normalise="all"`` that is the whole response (the weight
    scales only the per-token losses); under ``normalise="selected"`` the step passes the
    selected tokens as the mask, so the ratio averages over those.

    Where this differs from the public code (none was released with the paper): verl computes
    only the GSPO-token form and clamps the log-ratio at ``max=10``; EasyR1 clamps to
    ``[-20, 20]`` as here; TRL does not clamp (see :mod:`cppo_lightning.losses.gspo`).

    Logs (as ``train/<key>``): ``clip_frac`` (valid tokens in clipped responses; the paper
    reports about two orders of magnitude more than GRPO's, which is not a fault),
    ``seq_clip_frac`` (responses clipped), ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (of
    ``s_i``), ``dual_clip_frac``, ``approx_kl`` and ``loss``.

    Args:
        clip_low: Left clip range of ``s_i``, in [0, 1).
        clip_high: Right clip range of ``s_i``, >= 0.
        token_level: GSPO-token instead of GSPO.
        dual_clip: The cap ``c > 1`` on the loss of negative advantages; None disables it.
    """

    def __init__(
        self,
        clip_low: float = 3e-4,
        clip_high: float = 4e-4,
        token_level: bool = False,
        dual_clip: float | None = None,
    ) -> None:
        check_clip_settings(clip_low, clip_high, dual_clip, prefix="model.policy_loss.")
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.token_level = token_level

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        agg: str,
        agg_constant: float | None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return sequence_ratio_loss(
            logp,
            old_logp,
            advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            token_level=self.token_level,
            dual_clip=self.dual_clip,
            agg=agg,
            agg_constant=agg_constant,
            weight=weight,
        )
