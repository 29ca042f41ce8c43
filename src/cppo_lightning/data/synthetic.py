r"""Synthetic visual-perception task: coloured shapes on a dark canvas.

Each sample is a 112x112 RGB image with 1-5 non-overlapping shapes (circle, square, triangle),
each coloured red, green, blue or yellow, plus one question about the picture. The question kinds
are built so that a model that does not look is at chance (20-25%) on every one of them:

* ``single_color``: "What color is the shape?" (exactly one shape).
* ``unique_color``: "What color is the triangle?" (2-5 shapes, exactly one triangle).
* ``color_count``: "How many red shapes are there?" (the answer is uniform over 0-3).
* ``total_count``: "How many shapes are there?" (the answer is uniform over 1-5).
* ``leftmost_color``: "What color is the leftmost shape?" (2-5 shapes, the leftmost centre at
  least :data:`LEFTMOST_GAP` pixels left of the next).

Answers are canonical short strings (``"3"``, ``"red"``). Every sample also carries a short
reference ``solution`` in the response format ``<think>...</think>\boxed{answer}``, whose
rationale lists the shapes it read ("I see 2 red shapes: a red circle and a red square."), and
``perception_words``: the words of that rationale that state facts read from the image and not
from the question. "red" in the answer to "How many red shapes are there?" is copied from the
question and is not one; the shape types and the count are. The boxed answer repeats what the
rationale found, so a labeller should look inside ``<think>`` only (as
:func:`cppo_lightning.callbacks.monitor.perception_word_labels` does). Every sample keeps its
scene (``shapes``: type, colour, centre and size of each shape), so that dense per-region targets
can be computed from it (:func:`region_targets`). Everything is a deterministic function of the
seed: only local ``random.Random`` generators are used.
"""

from __future__ import annotations

import random
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
KINDS: tuple[str, ...] = (
    "single_color",
    "unique_color",
    "color_count",
    "total_count",
    "leftmost_color",
)
INSTRUCTION = "Think in <think></think>, then answer in \\boxed{}."

IMAGE_SIZE = 112
MIN_SIZE, MAX_SIZE = 20, 30  # side / diameter in pixels (a 14-px patch is about half a shape)
MARGIN = 4  # minimum gap in pixels between shapes and to the border
LEFTMOST_GAP = 8  # pixels between the leftmost centre and the next one
CELL = 28  # side of the image region one merged image token covers (2 x 2 patches of 14)
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


def _place(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """Places ``n`` (1-5) boxes ``(x0, y0, size)`` by rejection sampling with margins."""
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
                    return boxes


def _scene(rng: random.Random, looks: list[tuple[str, str]]) -> list[Shape]:
    """Shapes with the given ``(shape, color)`` looks at random non-overlapping places."""
    boxes = _place(rng, len(looks))
    return [
        {"shape": shape, "color": color, "x": x0 + size // 2, "y": y0 + size // 2, "size": size}
        for (shape, color), (x0, y0, size) in zip(looks, boxes, strict=True)
    ]


def _random_looks(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(rng.choice(SHAPES), rng.choice(COLORS)) for _ in range(n)]


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


def region_targets(shapes: list[Shape], image: Image.Image, min_visible: float = 0.5) -> np.ndarray:
    """Dense per-region facts of a scene, for pretraining a vision encoder on this task.

    The image is cut into :data:`CELL` x :data:`CELL` regions in row-major order, the regions one
    merged Qwen-VL image token covers (4 x 4 of them at 112 x 112). Per region, 0/1 targets:
    which of :data:`COLORS` any of its pixels shows, then the type (:data:`SHAPES`) and the
    colour (:data:`COLORS`) of the shapes whose centre lies in it. The targets describe what
    ``image`` shows: when parts of the scene are covered (an occluded copy of the sample's image),
    colours are read from its pixels and a shape counts only while at least ``min_visible`` of its
    pixels still show it.

    Args:
        shapes: The sample's ``shapes``.
        image: The sample's rendered ``image`` (exact palette colours, no anti-aliasing), or a
            copy of it with parts covered.
        min_visible: Share of a shape's pixels that must show for its centre targets.

    Returns:
        ``[regions, 2 * len(COLORS) + len(SHAPES)]`` float32.
    """
    side = IMAGE_SIZE // CELL
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # [H, W, 3]
    palette = {c: np.array(RGB[c], dtype=np.int16) for c in COLORS}
    present = np.stack([(pixels == palette[c]).all(-1) for c in COLORS], -1)  # [H, W, colours]
    cells = present[: side * CELL, : side * CELL].reshape(side, CELL, side, CELL, len(COLORS))
    targets = np.zeros((side * side, 2 * len(COLORS) + len(SHAPES)), dtype=np.float32)
    targets[:, : len(COLORS)] = cells.any(axis=(1, 3)).reshape(side * side, len(COLORS))
    for s in shapes:
        footprint = np.asarray(render([s])).any(-1)  # [H, W] the shape's own pixels
        shown = present[..., COLORS.index(s["color"])][footprint].mean()
        if shown < min_visible:
            continue
        region = min(s["y"] // CELL, side - 1) * side + min(s["x"] // CELL, side - 1)
        targets[region, len(COLORS) + SHAPES.index(s["shape"])] = 1.0
        targets[region, len(COLORS) + len(SHAPES) + COLORS.index(s["color"])] = 1.0
    return targets


def _listing(items: list[Shape]) -> str:
    """'a red circle, a blue circle and a green square'."""
    phrases = [f"a {s['color']} {s['shape']}" for s in items]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _seen(items: list[Shape], noun: str) -> str:
    """'I see 2 circles: a red circle and a blue circle.' (left to right)."""
    if not items:
        return f"I see 0 {noun}."
    return f"I see {len(items)} {noun}: {_listing(items)}."


def unique_color_question(
    rng: random.Random, shape: str, color: str
) -> tuple[list[Shape], str, str, str, list[str]]:
    """ "What color is the <shape>?" about a scene whose one ``shape`` is ``color``, beside 1-4
    shapes of the other types in random colours: (shapes, question, answer, rationale,
    perception_words)."""
    others = [k for k in SHAPES if k != shape]
    looks = [(shape, color)]
    looks += [(rng.choice(others), rng.choice(COLORS)) for _ in range(rng.randint(1, 4))]
    rng.shuffle(looks)
    shapes = _scene(rng, looks)
    (only,) = [s for s in shapes if s["shape"] == shape]
    rationale = _seen([only], shape)
    return shapes, f"What color is the {shape}?", only["color"], rationale, [only["color"]]


def _question(rng: random.Random, kind: str) -> tuple[list[Shape], str, str, str, list[str]]:
    """Draws a scene and its question: (shapes, question, answer, rationale, perception_words)."""
    if kind == "single_color":
        shapes = _scene(rng, _random_looks(rng, 1))
        (only,) = shapes
        rationale = _seen(shapes, "shape")
        return (
            shapes,
            "What color is the shape?",
            only["color"],
            rationale,
            [
                only["color"],
                only["shape"],
            ],
        )
    if kind == "unique_color":
        shape = rng.choice(SHAPES)
        return unique_color_question(rng, shape, rng.choice(COLORS))
    if kind == "color_count":
        color = rng.choice(COLORS)
        count = rng.randint(0, 3)
        others = [c for c in COLORS if c != color]
        n = rng.randint(max(count, 1), 5)
        looks = [(rng.choice(SHAPES), color) for _ in range(count)]
        looks += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(n - count)]
        rng.shuffle(looks)
        shapes = _scene(rng, looks)
        items = sorted((s for s in shapes if s["color"] == color), key=lambda s: s["x"])
        rationale = _seen(items, f"{color} {_plural('shape', count)}")
        words = [str(count), *(s["shape"] for s in items)]
        return shapes, f"How many {color} shapes are there?", str(count), rationale, words
    if kind == "total_count":
        shapes = _scene(rng, _random_looks(rng, rng.randint(1, 5)))
        items = sorted(shapes, key=lambda s: s["x"])
        rationale = _seen(items, _plural("shape", len(items)))
        words = [str(len(items)), *(w for s in items for w in (s["color"], s["shape"]))]
        return shapes, "How many shapes are there?", str(len(items)), rationale, words
    if kind == "leftmost_color":
        n = rng.randint(2, 5)
        while True:
            shapes = _scene(rng, _random_looks(rng, n))
            first, second = sorted(shapes, key=lambda s: s["x"])[:2]
            if second["x"] - first["x"] >= LEFTMOST_GAP:
                break
        rationale = f"The leftmost shape is a {first['color']} {first['shape']}."
        return (
            shapes,
            "What color is the leftmost shape?",
            first["color"],
            rationale,
            [
                first["color"],
                first["shape"],
            ],
        )
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


Question = tuple[list[Shape], str, str, str, list[str]]
"""(shapes, question, answer, rationale, perception_words), as :func:`_question` draws them."""


def question_record(
    kind: str, background: tuple[int, int, int], question: Question
) -> dict[str, Any]:
    """A sample's fields except the rendered image, from its drawn question."""
    shapes, text, answer, rationale, words = question
    return {
        "question": text,
        "answer": answer,
        "solution": f"<think>{rationale}</think>\\boxed{{{answer}}}",
        "perception_words": words,
        "kind": kind,
        "shapes": shapes,
        "background": background,
    }


def _sample_record(rng: random.Random) -> dict[str, Any]:
    """Draws everything except the rendered image (cheap; used by :func:`corpus`)."""
    kind = rng.choice(KINDS)
    background = rng.choice(BACKGROUNDS)
    return question_record(kind, background, _question(rng, kind))


def rendered(record: dict[str, Any]) -> dict[str, Any]:
    """A record of :func:`question_record` with its ``background`` drawn into ``image``."""
    record = dict(record)
    background = record.pop("background")
    return {"image": render(record["shapes"], background), **record}


def make_sample(rng: random.Random) -> dict[str, Any]:
    """Draws one sample; the question kind is uniform over :data:`KINDS`.

    Args:
        rng: Local generator; the sample is a deterministic function of its state.

    Returns:
        Dict with ``image`` (PIL RGB), ``question`` (without :data:`INSTRUCTION`), ``answer``,
        ``solution``, ``perception_words``, ``kind`` and ``shapes`` (list of
        ``{shape, color, x, y, size}`` dicts, ``x``/``y`` being the bounding-box centre).
    """
    return rendered(_sample_record(rng))


def generate_samples(n: int, seed: int) -> list[dict[str, Any]]:
    """Draws ``n`` samples from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [make_sample(rng) for _ in range(n)]


def build_dataset(n: int, seed: int) -> datasets.Dataset:
    """Builds a ``datasets.Dataset`` with the columns of :data:`FEATURES` (``shapes`` dropped)."""
    return samples_dataset(generate_samples(n, seed))


def samples_dataset(samples: list[dict[str, Any]]) -> datasets.Dataset:
    """The columns of :data:`FEATURES` of drawn samples as a ``datasets.Dataset``."""
    columns = {name: [s[name] for s in samples] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def prompt_text(question: str) -> str:
    """Returns the question followed by :data:`INSTRUCTION`, as shown to the model."""
    return f"{question} {INSTRUCTION}"


def derive_seed(seed: int, stream: int) -> int:
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

    @property
    def train_seed(self) -> int:
        """Seed of the training split: ``generate_samples(num_train, train_seed)`` gives its
        rows with their scenes."""
        return derive_seed(self.seed, 0)

    @property
    def val_seed(self) -> int:
        """Seed of the validation split."""
        return derive_seed(self.seed, 1)

    def load(self) -> datasets.DatasetDict:
        """Returns (and caches) the ``train`` and ``validation`` splits."""
        if self._data is None:
            self._data = datasets.DatasetDict(
                train=build_dataset(self.num_train, self.train_seed),
                validation=build_dataset(self.num_val, self.val_seed),
            )
        return self._data


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for tokenizer training: prompts (with :data:`INSTRUCTION`) and solutions.

    The first line lists the whole task vocabulary so that every word is seen at least once.
    """
    plurals = [f"{s}s" for s in SHAPES]
    vocab = " ".join(
        [*SHAPES, *plurals, *COLORS, "shape", "shapes", "leftmost", *map(str, range(10))]
    )
    rng = random.Random(seed)
    texts = [vocab, INSTRUCTION]
    for _ in range(n):
        record = _sample_record(rng)
        texts += [prompt_text(record["question"]), record["solution"]]
    return texts
