r"""Synthetic visual-perception task: coloured shapes on a dark canvas.

Each sample is a 112x112 RGB image with 1-5 non-overlapping shapes (circle, square, triangle),
each coloured red, green, blue or yellow, plus one question about the picture:

* ``count``: "How many circles are there?" / "How many red shapes are there?"
* ``color``: "What color is the triangle?" (only when exactly one triangle exists)
* ``exist``: "Is there a blue square?" (yes/no, balanced)
* ``position``: "Is the red circle left of the green square?" (yes/no, balanced; only between
  two uniquely identifiable shapes whose horizontal extents do not overlap)
* ``arith``: "How many circles and squares are there in total?" /
  "How many more circles than squares are there?" (never negative)

Answers are canonical short strings (``"3"``, ``"red"``, ``"yes"``). Every sample also carries a
short reference ``solution`` in the response format ``<think>...</think>\boxed{answer}``, written
from a small fixed vocabulary, and ``perception_words``: the words of the rationale that state
facts read from the image (counts, colours, shapes, left/right). Everything is a deterministic
function of the seed: only local ``random.Random`` generators are used.
"""

from __future__ import annotations

import random
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
KINDS: tuple[str, ...] = ("count", "color", "exist", "position", "arith")
INSTRUCTION = "Think in <think></think>, then answer in \\boxed{}."

IMAGE_SIZE = 112
MIN_SIZE, MAX_SIZE = 20, 30  # side / diameter in pixels (a 14-px patch is about half a shape)
MARGIN = 4  # minimum gap in pixels between shapes and to the border
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (40, 40, 40))

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "solution": datasets.Value("string"),
        "perception_words": datasets.Sequence(datasets.Value("string")),
        "kind": datasets.Value("string"),
    }
)

Shape = dict[str, Any]  # {"shape": str, "color": str, "x": int, "y": int, "size": int}


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _sample_scene(rng: random.Random) -> list[Shape]:
    """Places 1-5 shapes by rejection sampling on margin-padded bounding boxes."""
    n = rng.randint(1, 5)
    while True:
        boxes: list[tuple[int, int, int]] = []  # (x0, y0, size)
        for _ in range(200):
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            x0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
            y0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
            if all(
                x0 + size + MARGIN <= bx
                or bx + bs + MARGIN <= x0
                or y0 + size + MARGIN <= by
                or by + bs + MARGIN <= y0
                for bx, by, bs in boxes
            ):
                boxes.append((x0, y0, size))
                if len(boxes) == n:
                    break
        if len(boxes) == n:
            break
    return [
        {
            "shape": rng.choice(SHAPES),
            "color": rng.choice(COLORS),
            "x": x0 + size // 2,
            "y": y0 + size // 2,
            "size": size,
        }
        for x0, y0, size in boxes
    ]


def _box(s: Shape) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box ``(x0, y0, x1, y1)`` of a shape."""
    x0, y0 = s["x"] - s["size"] // 2, s["y"] - s["size"] // 2
    return x0, y0, x0 + s["size"] - 1, y0 + s["size"] - 1


def render(shapes: list[Shape], background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Draws ``shapes`` (centre ``x, y``, side/diameter ``size``) without anti-aliasing.

    Args:
        shapes: Shape metadata as stored under a sample's ``shapes`` key.
        background: RGB background colour.

    Returns:
        A ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image.
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = _box(s)
        fill = RGB[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _listing(items: list[Shape]) -> tuple[str, list[str]]:
    """'a red circle, a blue circle and a green square' plus its perception words."""
    phrases = [f"a {s['color']} {s['shape']}" for s in items]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text, [w for s in items for w in (s["color"], s["shape"])]


def _seen(items: list[Shape], noun: str, noun_words: list[str]) -> tuple[str, list[str]]:
    """'I see 2 circles: a red circle and a blue circle.' plus its perception words."""
    count = str(len(items))
    if not items:
        return f"I see {count} {noun}.", [count, *noun_words]
    listing, words = _listing(items)
    return f"I see {count} {noun}: {listing}.", [count, *noun_words, *words]


def _question(rng: random.Random, kind: str, shapes: list[Shape]) -> tuple | None:
    """Builds (question, answer, rationale, perception_words), or None if the scene can't."""
    left_to_right = sorted(shapes, key=lambda s: s["x"])
    of = {k: [s for s in left_to_right if s["shape"] == k] for k in SHAPES}
    if kind == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            noun = _plural(shape, len(of[shape]))
            text, words = _seen(of[shape], noun, [noun])
            question = f"How many {shape}s are there?"
            items = of[shape]
        else:
            color = rng.choice(COLORS)
            items = [s for s in left_to_right if s["color"] == color]
            text, words = _seen(items, f"{color} {_plural('shape', len(items))}", [color])
            question = f"How many {color} shapes are there?"
        answer = str(len(items))
        return question, answer, f"{text} So {answer}.", words
    if kind == "color":
        single = [k for k in SHAPES if len(of[k]) == 1]
        if not single:
            return None
        shape = rng.choice(single)
        color = of[shape][0]["color"]
        question = f"What color is the {shape}?"
        return (
            question,
            color,
            f"I see 1 {shape} and it is {color}. So {color}.",
            ["1", shape, color],
        )
    if kind == "exist":
        present = sorted({(s["color"], s["shape"]) for s in shapes})
        if rng.random() < 0.5:
            color, shape = rng.choice(present)
        else:
            color, shape = rng.choice(
                [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
            )
        answer = "yes" if (color, shape) in present else "no"
        noun = _plural(shape, len(of[shape]))
        text, words = _seen(of[shape], noun, [noun])
        return f"Is there a {color} {shape}?", answer, f"{text} So {answer}.", words
    if kind == "position":
        combos = [(s["color"], s["shape"]) for s in shapes]
        unique: list[Shape] = [
            s for s in left_to_right if combos.count((s["color"], s["shape"])) == 1
        ]
        pairs: list[tuple[Shape, Shape]] = [
            (p, q) for i, p in enumerate(unique) for q in unique[i + 1 :] if _box(p)[2] < _box(q)[0]
        ]  # a lies strictly left of b
        if not pairs:
            return None
        first, second = rng.choice(pairs)  # first is left of second
        if rng.random() < 0.5:
            first, second = second, first
        relation = rng.choice(("left", "right"))
        first_side = "left" if first["x"] < second["x"] else "right"
        second_side = "right" if first_side == "left" else "left"
        answer = "yes" if relation == first_side else "no"
        name_1 = f"{first['color']} {first['shape']}"
        name_2 = f"{second['color']} {second['shape']}"
        text = f"The {name_1} is on the {first_side} and the {name_2} is on the {second_side}."
        words = [
            first["color"],
            first["shape"],
            first_side,
            second["color"],
            second["shape"],
            second_side,
        ]
        return f"Is the {name_1} {relation} of the {name_2}?", answer, f"{text} So {answer}.", words
    if kind == "arith":
        one, two = rng.sample(SHAPES, 2)
        n1, n2 = len(of[one]), len(of[two])
        if rng.random() < 0.5:
            question = f"How many {one}s and {two}s are there in total?"
            answer, expr = str(n1 + n2), f"{n1} + {n2} = {n1 + n2}."
        else:
            if n1 < n2:
                (one, n1), (two, n2) = (two, n2), (one, n1)
            question = f"How many more {one}s than {two}s are there?"
            answer, expr = str(n1 - n2), f"{n1} - {n2} = {n1 - n2}."
        w1, w2 = _plural(one, n1), _plural(two, n2)
        text = f"I see {n1} {w1} and {n2} {w2}. {expr}"
        return question, answer, text, [str(n1), w1, str(n2), w2]
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def _sample_record(rng: random.Random) -> dict[str, Any]:
    """Draws everything except the rendered image (cheap; used by :func:`corpus`)."""
    kind = rng.choice(KINDS)
    background = rng.choice(BACKGROUNDS)
    while True:
        shapes = _sample_scene(rng)
        built = _question(rng, kind, shapes)
        if built is not None:
            break
    question, answer, rationale, words = built
    return {
        "question": question,
        "answer": answer,
        "solution": f"<think>{rationale}</think>\\boxed{{{answer}}}",
        "perception_words": words,
        "kind": kind,
        "shapes": shapes,
        "background": background,
    }


def make_sample(rng: random.Random) -> dict[str, Any]:
    """Draws one sample; the question kind is uniform over :data:`KINDS`.

    Args:
        rng: Local generator; the sample is a deterministic function of its state.

    Returns:
        Dict with ``image`` (PIL RGB), ``question`` (without :data:`INSTRUCTION`), ``answer``,
        ``solution``, ``perception_words``, ``kind`` and ``shapes`` (list of
        ``{shape, color, x, y, size}`` dicts, ``x``/``y`` being the bounding-box centre).
    """
    record = _sample_record(rng)
    background = record.pop("background")
    return {"image": render(record["shapes"], background), **record}


def generate_samples(n: int, seed: int) -> list[dict[str, Any]]:
    """Draws ``n`` samples from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [make_sample(rng) for _ in range(n)]


def build_dataset(n: int, seed: int) -> datasets.Dataset:
    """Builds a ``datasets.Dataset`` with the columns of :data:`FEATURES` (``shapes`` dropped)."""
    samples = generate_samples(n, seed)
    columns = {name: [s[name] for s in samples] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def prompt_text(question: str) -> str:
    """Returns the question followed by :data:`INSTRUCTION`, as shown to the model."""
    return f"{question} {INSTRUCTION}"


def _derive_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class SyntheticShapes:
    """Dataset source for the synthetic shapes task (train/validation generated in memory).

    Args:
        num_train: Number of training samples.
        num_val: Number of validation samples.
        seed: Base seed; the two splits use different seeds derived from it.
    """

    num_train: int
    """Number of training samples."""
    num_val: int
    """Number of validation samples."""
    seed: int
    """Base seed; train and validation are drawn from different seeds derived from it."""

    def __init__(self, num_train: int = 2000, num_val: int = 256, seed: int = 0) -> None:
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}")
        if num_val < 1:
            raise ValueError(f"num_val must be >= 1, got {num_val}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self._data: datasets.DatasetDict | None = None

    def load(self) -> datasets.DatasetDict:
        """Returns (and caches) the ``train`` and ``validation`` splits."""
        if self._data is None:
            self._data = datasets.DatasetDict(
                train=build_dataset(self.num_train, _derive_seed(self.seed, 0)),
                validation=build_dataset(self.num_val, _derive_seed(self.seed, 1)),
            )
        return self._data


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for tokenizer training: prompts (with :data:`INSTRUCTION`) and solutions.

    The first line lists the whole task vocabulary so that every word is seen at least once.
    """
    plurals = [f"{s}s" for s in SHAPES]
    vocab = " ".join(
        [
            *SHAPES,
            *plurals,
            *COLORS,
            "shape",
            "shapes",
            *map(str, range(10)),
            "yes",
            "no",
            "left",
            "right",
            "+",
            "-",
            "=",
        ]
    )
    rng = random.Random(seed)
    texts = [vocab, INSTRUCTION]
    for _ in range(n):
        record = _sample_record(rng)
        texts += [prompt_text(record["question"]), record["solution"]]
    return texts
