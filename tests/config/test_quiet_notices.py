"""The messages silenced because a user cannot act on them are silenced by their exact text and
source only: the same kind of message from anywhere else still shows."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from cppo_lightning.cli import main, quiet_upstream_notices
from tests.helpers.runs import BASE

TIP = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
    "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics "
    "and artifacts automatically to the Lightning Experiments platform."
)
LEAF = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
    "treespec.is_leaf()` instead."
)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_litlogger_tip_is_dropped_and_other_lines_are_not():
    quiet_upstream_notices()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = _Lines()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rank_zero_info(TIP)
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.lines == ["GPU available: False, used: False"]


def test_the_pytree_warning_is_dropped_only_from_lightnings_module():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_notices()
        for module in ("lightning.pytorch.utilities._pytree", "mypkg.trees"):
            warnings.warn_explicit(LEAF, FutureWarning, "trees.py", 21, module=module)
        warnings.warn_explicit("another future", FutureWarning, "_pytree.py", 30,
                               module="lightning.pytorch.utilities._pytree")  # fmt: skip
    assert [(str(w.message), w.filename) for w in caught] == [
        (LEAF, "trees.py"),
        ("another future", "_pytree.py"),
    ]


def test_the_eval_mode_warning_is_dropped_for_the_frozen_reference_only():
    def warn_like_lightning(count: int) -> None:  # lightning/pytorch/loops/fit_loop.py, 2.6
        rank_zero_warn(
            f"Found {count} module(s) in eval mode at the start of training. This may lead to "
            "unexpected behavior during training. If this is intentional, you can ignore this "
            "warning.",
            category=PossibleUserWarning,
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = main(["--config", BASE, "--trainer.logger=false"], run=False).model
        module.configure_model()
        module.train()
        assert module.reference is not None
        in_eval = sum(not m.training for m in module.modules())
        assert in_eval == sum(1 for _ in module.reference.modules())
        caught.clear()
        warn_like_lightning(in_eval)  # the reference alone: by design
        assert caught == []
        module.policy.lm_head.eval()  # a policy module left in eval mode by mistake
        warn_like_lightning(in_eval + 1)
    assert [str(w.message).split(".")[0] for w in caught] == [
        f"Found {in_eval + 1} module(s) in eval mode at the start of training"
    ]
