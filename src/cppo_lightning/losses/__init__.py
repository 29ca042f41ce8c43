"""Loss functions as pure tensor functions (docs/method.md §1, §3 and §5).

``grpo`` holds the base RL objective: group advantages, the clipped policy loss, the KL estimators
and the token aggregation they share. ``cpl`` holds CPPO's Contrastive Perception Loss over the
selected perception tokens, and ``papo`` the PAPO baseline's implicit perception loss.
"""

from cppo_lightning.losses.cpl import contrastive_perception_loss
from cppo_lightning.losses.grpo import (
    aggregate,
    global_std,
    group_advantages,
    kl_estimate,
    policy_loss,
)
from cppo_lightning.losses.papo import implicit_perception_loss

__all__ = [
    "aggregate",
    "contrastive_perception_loss",
    "global_std",
    "group_advantages",
    "implicit_perception_loss",
    "kl_estimate",
    "policy_loss",
]
