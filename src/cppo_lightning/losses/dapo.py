"""DAPO's reward shaping, rollout filter and overlong filtering (arXiv 2503.14476), pure tensors.

DAPO changes GRPO in four places; two already exist in :func:`cppo_lightning.losses.policy_loss`
(clip-higher, ``clip_high=0.28``; token-level loss, ``agg="token-mean"``). This module holds the
math of the other two plus the "overlong filtering" the paper ablates::

    reward = reward + overlong_penalty(lengths, max_length=20480, cache_length=4096)   # [N]
    keep = informative_groups(accuracy, group_size=G)                                # bool [B]
    mask = drop_truncated(response_mask, truncated)                                 # [N, L]

Where each is used: ``overlong_penalty`` by the reward term
:class:`cppo_lightning.rewards_dapo.OverlongPenalty`, ``informative_groups`` by the
``rollout.filter`` :class:`cppo_lightning.methods.DynamicSampling` (the rounds that sample more
prompts are the rollout callback's), ``drop_truncated`` by the ``model.token_weighting``
:class:`cppo_lightning.methods.DropTruncated`; ``configs/experiments/dapo.yaml`` turns DAPO on.

Sources (paper = arXiv 2503.14476 v1, the PDF in ``BytedTsinghua-SIA/DAPO``):

- Soft overlong punishment, paper Eq. (13): 0 for ``|y| <= L_max - L_cache``,
  ``((L_max - L_cache) - |y|) / L_cache`` for ``L_max - L_cache < |y| <= L_max``, -1 beyond;
  section 4.1: ``L_max - L_cache = 16,384`` expected tokens plus a 4,096-token cache, so 20,480
  generated at most. verl's ``DAPORewardManager`` (``verl/workers/reward_manager/dapo.py``)
  computes ``min(-(len - (max_resp_len - buffer_len)) / buffer_len * penalty_factor, 0)`` with
  ``overlong_buffer.len=4096``, ``penalty_factor=1.0``, ``max_response_length=20480``
  (``recipe/dapo/run_dapo_qwen2.5_32b.sh``) and adds it to the correctness score.
- Dynamic sampling, paper Eq. (11): keep a prompt when ``0 < |{o_i correct}| < G``, i.e. filter
  on *accuracy*. verl's DAPO trainer (``recipe/dapo/dapo_ray_trainer.py``) keeps a group when
  ``np.std(metric) > 0`` or the group has one response, with ``filter_groups.metric=acc`` in the
  recipe (``score``, ``seq_reward``, ``seq_final_reward`` are the alternatives),
  ``max_num_gen_batches=10`` and ``gen_batch_size = 3 * train_batch_size``.
- Overlong filtering (paper section 3.4, Table 1): mask the loss of truncated samples. The recipe
  runs without it (verl ``docs/algo/dapo.md``, FAQ), relying on the soft punishment instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["drop_truncated", "informative_groups", "overlong_penalty"]


def overlong_penalty(
    lengths: Tensor,
    max_length: int,
    cache_length: int,
    *,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment of each response, to be added to its reward.

    With ``expected = max_length - cache_length``::

        penalty = 0                                              |y| <= expected
                = -(|y| - expected) / cache_length * factor      expected < |y| <= max_length
                = -factor                                        |y| > max_length

    The middle branch is verl's formula; the cap at ``-factor`` beyond ``max_length`` is the
    paper's third case (verl never sees such lengths, since generation stops at
    ``max_response_length``); the two agree at ``|y| = max_length``, where the penalty is
    exactly ``-factor``.

    Args:
        lengths: Number of generated tokens of each response (integer or float; EOS counted as
            the rollout counts it).
        max_length: ``L_max``, the generation limit in tokens (paper: 20,480).
        cache_length: ``L_cache``, the soft punishment interval in tokens, ``0 < cache_length <=
            max_length`` (paper: 4,096).
        penalty_factor: The penalty at ``L_max`` (paper: 1; verl's ``penalty_factor=1.0``).

    Returns:
        The penalty of each response, in ``[-penalty_factor, 0]``, in the default float dtype
        (or ``lengths``' float dtype).

    Raises:
        ValueError: If ``lengths`` is not 1-D, or the lengths or factor are out of range.

    Shape:
        - lengths: ``[N]``.
        - output: ``[N]``.
    """
    if lengths.dim() != 1:
        raise ValueError(
            f"lengths must be 1-D [N] (one token count per response), got {tuple(lengths.shape)}."
        )
    for name, value in (("max_length", max_length), ("cache_length", cache_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (tokens), got {value!r}.")
    if cache_length > max_length:
        raise ValueError(
            f"cache_length ({cache_length}) must not exceed max_length ({max_length}): the soft "
            "punishment interval lies inside the generation limit (DAPO: 4096 of 20480)."
        )
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor!r}.")

    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    length = lengths.to(dtype)  # [N]
    expected = max_length - cache_length
    penalty = -(length - expected) / cache_length * penalty_factor  # [N]
    return penalty.clamp(min=-penalty_factor, max=0.0)  # [N]


def informative_groups(values: Tensor, group_size: int) -> Tensor:
    """Which groups carry a learning signal: their values are not all equal (DAPO's filter).

    A group whose rewards (or accuracies) are all equal gets advantage 0 everywhere under GRPO,
    so it only dilutes the batch; DAPO drops it and samples more prompts. Equality is exact, as
    verl's ``np.std(metric) > 0``; a group holding a NaN or an infinity is not informative (verl's
    std is NaN there and the comparison fails). A group of one response is kept, as verl keeps
    it (``len(...) == 1``), though GRPO needs ``group_size >= 2`` anyway.

    Which values to pass is the caller's choice and matters: the paper and verl's recipe filter on
    accuracy (``filter_groups.metric=acc``); filtering on the total ``0.9 * accuracy + 0.1 *
    format`` keeps all-correct groups whose format terms differ.

    Args:
        values: One value per response, group-contiguous (rows ``g*G .. g*G + G - 1``).
        group_size: G, the responses per prompt; >= 1.

    Returns:
        A bool per group, True where the group is informative.

    Raises:
        ValueError: If ``values`` is not 1-D, ``group_size`` is not a positive int, or N is not
            a multiple of it.

    Shape:
        - values: ``[N]`` with ``N = B * G``.
        - output: ``[B]``, dtype bool.
    """
    if values.dim() != 1:
        raise ValueError(
            f"values must be 1-D [N] (one per response), got shape {tuple(values.shape)}."
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}.")
    if values.shape[0] % group_size != 0:
        raise ValueError(
            f"the number of values ({values.shape[0]}) is not a multiple of group_size "
            f"({group_size}); pass group_size values per prompt."
        )
    grouped = values.detach().view(-1, group_size)  # [B, G]
    if group_size == 1:
        return torch.ones(grouped.shape[0], dtype=torch.bool, device=values.device)
    varied = (grouped != grouped[:, :1]).any(dim=1)  # [B]
    if grouped.is_floating_point():
        varied = varied & torch.isfinite(grouped).all(dim=1)  # [B]
    return varied


def drop_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO's overlong filtering: remove truncated responses from the loss.

    Args:
        mask: Response mask; non-zero (or True) marks a valid token.
        truncated: True for each response cut at the generation limit (no EOS).

    Returns:
        ``mask`` with the rows of truncated responses zeroed, in ``mask``'s dtype.

    Raises:
        ValueError: On mismatched shapes.

    Shape:
        - mask: ``[N, L]``.
        - truncated: ``[N]``.
        - output: ``[N, L]``.
    """
    if mask.dim() != 2 or truncated.shape != mask.shape[:1]:
        raise ValueError(
            f"mask must be [N, L] and truncated [N], got {tuple(mask.shape)} and "
            f"{tuple(truncated.shape)}."
        )
    keep = ~truncated.bool().unsqueeze(1)  # [N, 1]
    return torch.where(keep, mask, torch.zeros_like(mask))  # [N, L]
