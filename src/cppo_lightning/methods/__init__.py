"""Methods as components at the named seams of :mod:`cppo_lightning.seams`.

One file per method; each component's docstring states its defaults and where they come from
(``docs/methods.md`` has the same, with the overlay under ``configs/experiments/`` that turns the
method on). GRPO's clipped token-ratio surrogate (:class:`ClippedTokenRatio`) is the default
of the ``model.policy_loss`` seam; CPPO's and PAPO's objectives are in
:mod:`cppo_lightning.perception`.
"""

from cppo_lightning.methods.dapo import DropTruncated, DynamicSampling
from cppo_lightning.methods.grpo import ClippedTokenRatio
from cppo_lightning.methods.gspo import SequenceRatio
from cppo_lightning.methods.high_entropy import HighEntropyTokens
from cppo_lightning.methods.noisyrollout import NoisyRollout
from cppo_lightning.methods.vppo import DependencyShaping, DependentTokens, EntropyPenalty

__all__ = [
    "ClippedTokenRatio",
    "DependencyShaping",
    "DependentTokens",
    "DropTruncated",
    "DynamicSampling",
    "EntropyPenalty",
    "HighEntropyTokens",
    "NoisyRollout",
    "SequenceRatio",
]
