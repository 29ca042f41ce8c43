"""Tests for the synthetic shapes task: determinism, rendering and answer correctness."""

from __future__ import annotations

import random
import re
from collections import Counter

import datasets
import numpy as np
import pytest

from cppo_lightning.data import synthetic
from cppo_lightning.data.synthetic import (
    COLORS,
    INSTRUCTION,
    SHAPES,
    SyntheticShapes,
    build_dataset,
    corpus,
    generate_samples,
    make_sample,
)

SOLUTION_RE = re.compile(r"^<think>(.*)</think>.*\\boxed\{(.*)\}.*$", re.DOTALL)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return generate_samples(200, seed=7)


def _pixel_scene(image) -> list[dict]:
    """Recovers shapes from pixels: connected components, colour by palette, kind by fill ratio."""
    pixels = np.asarray(image).astype(int)
    palette = {c: np.array(rgb) for c, rgb in synthetic.RGB.items()}
    labels = np.full(pixels.shape[:2], "", dtype=object)
    for name, rgb in palette.items():
        labels[(pixels == rgb).all(axis=-1)] = name
    seen = np.zeros(labels.shape, dtype=bool)
    found = []
    for y0, x0 in zip(*np.nonzero(labels != ""), strict=True):
        if seen[y0, x0]:
            continue
        color, stack, points = labels[y0, x0], [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (
                    0 <= ny < labels.shape[0]
                    and 0 <= nx < labels.shape[1]
                    and not seen[ny, nx]
                    and labels[ny, nx] == color
                ):
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(points).T
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        fill = len(points) / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        found.append({"shape": shape, "color": color, "box": box})
    return sorted(found, key=lambda s: s["box"])


def _oracle(question: str, scene: list[dict]) -> str:
    """Answers a question from a recovered scene, independently of the generator."""

    def count(shape=None, color=None):
        return sum(
            (shape is None or s["shape"] == shape) and (color is None or s["color"] == color)
            for s in scene
        )

    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(count(shape=m[1]))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(count(color=m[1]))
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (only,) = [s for s in scene if s["shape"] == m[1]]  # asked only when unique
        return only["color"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if count(m[2], m[1]) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left|right) of the (\w+) (\w+)\?", question):
        (a,) = [s for s in scene if (s["color"], s["shape"]) == (m[1], m[2])]
        (b,) = [s for s in scene if (s["color"], s["shape"]) == (m[4], m[5])]
        assert a["box"][2] < b["box"][0] or b["box"][2] < a["box"][0], "no clear gap"
        a_left = a["box"][2] < b["box"][0]
        return "yes" if a_left == (m[3] == "left") else "no"
    if m := re.fullmatch(r"How many (\w+)s and (\w+)s are there in total\?", question):
        return str(count(m[1]) + count(m[2]))
    if m := re.fullmatch(r"How many more (\w+)s than (\w+)s are there\?", question):
        return str(count(m[1]) - count(m[2]))
    raise AssertionError(f"unexpected question {question!r}")


def test_same_seed_is_deterministic() -> None:
    a, b = generate_samples(20, seed=3), generate_samples(20, seed=3)
    for x, y in zip(a, b, strict=True):
        assert x["image"].tobytes() == y["image"].tobytes()
        assert {k: v for k, v in x.items() if k != "image"} == {
            k: v for k, v in y.items() if k != "image"
        }


def test_different_seed_differs() -> None:
    a, b = generate_samples(20, seed=3), generate_samples(20, seed=4)
    assert [s["image"].tobytes() for s in a] != [s["image"].tobytes() for s in b]
    assert [s["question"] for s in a] != [s["question"] for s in b]


def test_global_rng_untouched() -> None:
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    make_sample(random.Random(0))
    generate_samples(5, seed=1)
    assert random.getstate() == py_state
    assert (np.random.get_state()[1] == np_state).all()


def test_images_and_layout(samples: list[dict]) -> None:
    for s in samples:
        assert s["image"].size == (112, 112) and s["image"].mode == "RGB"
        assert 1 <= len(s["shapes"]) <= 5
        boxes = [synthetic._box(sh) for sh in s["shapes"]]
        for sh, (x0, y0, x1, y1) in zip(s["shapes"], boxes, strict=True):
            assert sh["shape"] in SHAPES and sh["color"] in COLORS
            assert 20 <= sh["size"] <= 30
            assert x0 >= 0 and y0 >= 0 and x1 < 112 and y1 < 112
        for i, a in enumerate(boxes):  # disjoint with a margin
            for b in boxes[i + 1 :]:
                assert (
                    a[2] + synthetic.MARGIN < b[0]
                    or b[2] + synthetic.MARGIN < a[0]
                    or a[3] + synthetic.MARGIN < b[1]
                    or b[3] + synthetic.MARGIN < a[1]
                )


def test_pixels_match_metadata_and_answers(samples: list[dict]) -> None:
    for s in samples:
        scene = _pixel_scene(s["image"])
        expected = sorted(
            (
                {"shape": sh["shape"], "color": sh["color"], "box": synthetic._box(sh)}
                for sh in s["shapes"]
            ),
            key=lambda d: d["box"],
        )
        assert [(d["shape"], d["color"]) for d in scene] == [
            (d["shape"], d["color"]) for d in expected
        ]
        for got, want in zip(scene, expected, strict=True):
            assert np.abs(np.subtract(got["box"], want["box"])).max() <= 1
        assert _oracle(s["question"], scene) == s["answer"], s["question"]


def test_solutions_and_perception_words(samples: list[dict]) -> None:
    for s in samples:
        m = SOLUTION_RE.match(s["solution"])
        assert m, s["solution"]
        assert m[2] == s["answer"]
        words = re.findall(r"[a-z0-9]+", m[1])
        assert len(m[1].split()) <= 25
        assert s["perception_words"] and all(w in words for w in s["perception_words"])
        if s["kind"] in ("exist", "position"):
            assert s["answer"] in ("yes", "no")
        elif s["kind"] == "color":
            assert s["answer"] in COLORS
        else:
            assert s["answer"].isdigit()


def test_kinds_and_balance(samples: list[dict]) -> None:
    kinds = Counter(s["kind"] for s in samples)
    assert set(kinds) == set(synthetic.KINDS)
    assert min(kinds.values()) >= 20
    for kind in ("exist", "position"):
        answers = Counter(s["answer"] for s in samples if s["kind"] == kind)
        assert answers["yes"] >= 5 and answers["no"] >= 5


def test_build_dataset_features() -> None:
    ds = build_dataset(8, seed=0)
    assert ds.column_names == [
        "image",
        "question",
        "answer",
        "solution",
        "perception_words",
        "kind",
    ]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["perception_words"].feature == datasets.Value("string")
    row = ds[0]
    assert row["image"].size == (112, 112)
    assert row["answer"] == generate_samples(1, seed=0)[0]["answer"]


def test_source_splits() -> None:
    source = SyntheticShapes(num_train=10, num_val=6, seed=1)
    data = source.load()
    assert source.load() is data  # cached
    assert set(data) == {"train", "validation"}
    assert (data["train"].num_rows, data["validation"].num_rows) == (10, 6)
    assert data["train"]["solution"][:6] != data["validation"]["solution"]
    again = SyntheticShapes(num_train=10, num_val=6, seed=1).load()
    assert again["train"]["solution"] == data["train"]["solution"]
    other = SyntheticShapes(num_train=10, num_val=6, seed=2).load()
    assert other["train"]["solution"] != data["train"]["solution"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": 0}, "num_train must be >= 1, got 0"),
        ({"num_val": -1}, "num_val must be >= 1, got -1"),
        ({"seed": -5}, "seed must be >= 0, got -5"),
    ],
)
def test_bad_constructor_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SyntheticShapes(**kwargs)


def test_corpus() -> None:
    texts = corpus(50, seed=0)
    assert texts == corpus(50, seed=0)
    assert INSTRUCTION in texts
    assert any(INSTRUCTION in t and t.endswith(INSTRUCTION) and "?" in t for t in texts)
    assert sum(t.startswith("<think>") for t in texts) == 50
