"""Loss functions as pure tensor functions (spec §1 and §3).

``grpo`` holds the base RL objective: group advantages, the clipped policy loss, the KL estimators
and the token aggregation they share.
"""

from cppo_lightning.losses.grpo import aggregate, group_advantages, kl_estimate, policy_loss

__all__ = ["aggregate", "group_advantages", "kl_estimate", "policy_loss"]
