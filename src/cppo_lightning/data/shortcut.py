r"""The language-shortcut testbed: the shapes task with a text-side prior a model can answer from.

On the plain synthetic task (:mod:`cppo_lightning.data.synthetic`) a model that does not look is at
chance on every question kind, so outcome reward alone keeps it looking. Here the training split
carries a prior in the question's wording: "What color is the triangle?" is answered "red" with
probability ``prior`` (:data:`PRIORS`: triangle red, square blue, circle yellow), and such questions
make up ``share`` of the split, the rest being the four other kinds of the plain task, unchanged.
A policy that answers the prior colour without looking earns ``prior`` of the accuracy reward on
those questions; one that looks earns its perception accuracy, which starts lower on the shipped
warm start (about 58% greedy, 36% sampled on this kind). Outcome-only RL can then drift towards
the prior and stop looking ("visual forgetting"), the failure perception-aware methods claim to
prevent.

Splits:

* ``train`` and ``validation``: the same prior and mix (``validation`` measures in-distribution
  accuracy; ``configs/eval/shortcut.yaml``).
* ``counter``: ``num_counter`` "What color is the <shape>?" questions whose answer is never the
  prior colour (uniform over the other three), so only a model that looks is right
  (``configs/eval/shortcut-counter.yaml``). Its blank-image accuracy is 0 for a model that answers
  the prior, and at most 1/3 for one that guesses among the other colours.

Every split is a deterministic function of ``seed``; rows have the columns of
:data:`cppo_lightning.data.synthetic.FEATURES` (``kind`` is ``unique_color`` for the prior's
questions).
"""

from __future__ import annotations

import random
from typing import Any

import datasets

from cppo_lightning.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    SHAPES,
    SyntheticShapes,
    _question,
    derive_seed,
    question_record,
    rendered,
    samples_dataset,
    unique_color_question,
)

PRIORS: dict[str, str] = {"triangle": "red", "square": "blue", "circle": "yellow"}
"""The colour the question's wording predicts: "What color is the <shape>?" -> PRIORS[shape]."""
PRIOR_KIND = "unique_color"
"""The question kind that carries the prior."""
OTHER_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k != PRIOR_KIND)
"""The kinds drawn as on the plain task (no text-side prior)."""


def shortcut_record(rng: random.Random, prior: float, share: float) -> dict[str, Any]:
    """Draws one row of the ``train``/``validation`` splits (without its image).

    With probability ``share`` a "What color is the <shape>?" question whose answer is
    ``PRIORS[shape]`` with probability ``prior`` and else uniform over the other colours; otherwise
    a question of :data:`OTHER_KINDS` (uniform), drawn as on the plain task.
    """
    background = rng.choice(BACKGROUNDS)
    if rng.random() >= share:
        kind = rng.choice(OTHER_KINDS)
        return question_record(kind, background, _question(rng, kind))
    shape = rng.choice(SHAPES)
    others = [c for c in COLORS if c != PRIORS[shape]]
    color = PRIORS[shape] if rng.random() < prior else rng.choice(others)
    return question_record(PRIOR_KIND, background, unique_color_question(rng, shape, color))


def counter_record(rng: random.Random) -> dict[str, Any]:
    """Draws one row of the ``counter`` split: the answer is never the prior colour."""
    background = rng.choice(BACKGROUNDS)
    shape = rng.choice(SHAPES)
    color = rng.choice([c for c in COLORS if c != PRIORS[shape]])
    return question_record(PRIOR_KIND, background, unique_color_question(rng, shape, color))


class ShortcutShapes(SyntheticShapes):
    """Dataset source for the language-shortcut testbed (``train``, ``validation``, ``counter``).

    Args:
        num_train: Number of training samples.
        num_val: Number of in-distribution validation samples (same prior and mix as training).
        seed: Base seed; the three splits use different seeds derived from it.
        prior: Probability that a prior-kind question's answer is the colour its wording
            predicts (:data:`PRIORS`), in ``[0, 1]``. Chance is 0.25.
        share: Fraction of ``train``/``validation`` rows that are prior-kind questions, in
            ``[0, 1]`` (the plain task has 0.2 of this kind, with no prior).
        num_counter: Number of counter-prior samples (the prior colour is never the answer).
    """

    prior: float
    """Probability that a prior-kind question's answer is the colour its wording predicts."""
    share: float
    """Fraction of train/validation rows that are prior-kind questions."""
    num_counter: int
    """Number of counter-prior samples."""

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 256,
        seed: int = 0,
        prior: float = 0.9,
        share: float = 0.5,
        num_counter: int = 256,
    ) -> None:
        super().__init__(num_train=num_train, num_val=num_val, seed=seed)
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], got {prior}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        if num_counter < 1:
            raise ValueError(f"num_counter must be >= 1, got {num_counter}")
        self.prior = prior
        self.share = share
        self.num_counter = num_counter

    @property
    def counter_seed(self) -> int:
        """Seed of the counter-prior split."""
        return derive_seed(self.seed, 2)

    def samples(self, split: str) -> list[dict[str, Any]]:
        """The rows of ``split`` with their scenes (``shapes``) and rendered images."""
        if split == "counter":
            rng = random.Random(self.counter_seed)
            return [rendered(counter_record(rng)) for _ in range(self.num_counter)]
        sizes = {
            "train": (self.num_train, self.train_seed),
            "validation": (self.num_val, self.val_seed),
        }
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; expected train, validation or counter")
        n, seed = sizes[split]
        rng = random.Random(seed)
        return [rendered(shortcut_record(rng, self.prior, self.share)) for _ in range(n)]

    def load(self) -> datasets.DatasetDict:
        """Returns (and caches) the ``train``, ``validation`` and ``counter`` splits."""
        if self._data is None:
            self._data = datasets.DatasetDict(
                {
                    split: samples_dataset(self.samples(split))
                    for split in ("train", "validation", "counter")
                }
            )
        return self._data
