"""Evaluation: ``cppo evaluate`` and the in-training :class:`~cppo_lightning.callbacks.Evaluation`.

- :mod:`.sets`: a benchmark's rows -> prompts, images and gradable answers (``configs/eval/``);
- :mod:`.conditions`: the image conditions (original, blank, mean, shuffled, preserving, removing);
- :mod:`.engine`: units of work, their seeds, sampling and grading;
- :mod:`.metrics`: avg@k, std over sample sets, interval, pass@k, answers kept;
- :mod:`.report`: responses.jsonl, results.json/csv/md, TensorBoard;
- :mod:`.loop`: the Lightning predict loop; :mod:`.command`: the command line.
"""

from cppo_lightning.evaluation.conditions import CONDITIONS, ImageConditions, shuffle_partners
from cppo_lightning.evaluation.metrics import ConditionStats, majority_answer
from cppo_lightning.evaluation.sets import EvalSet, load_eval_set, option_letter, parse_options

__all__ = [
    "CONDITIONS",
    "ConditionStats",
    "EvalSet",
    "ImageConditions",
    "load_eval_set",
    "majority_answer",
    "option_letter",
    "parse_options",
    "shuffle_partners",
]
