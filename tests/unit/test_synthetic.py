"""Tests for the synthetic shapes task: determinism, rendering, answer correctness, balance."""

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
    region_targets,
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
    if question == "What color is the shape?":
        (only,) = scene  # asked only of single-shape images
        return only["color"]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (only,) = [s for s in scene if s["shape"] == m[1]]  # asked only when unique
        assert len(scene) >= 2
        return only["color"]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(s["color"] == m[1] for s in scene))
    if question == "How many shapes are there?":
        return str(len(scene))
    if question == "What color is the leftmost shape?":
        first, second = sorted(scene, key=lambda s: s["box"][0] + s["box"][2])[:2]
        gap = (second["box"][0] + second["box"][2] - first["box"][0] - first["box"][2]) / 2
        assert gap >= synthetic.LEFTMOST_GAP - 1, "no clear leftmost shape"
        return first["color"]
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
        # Facts read from the image, never words the question already gives.
        question_words = set(re.findall(r"[a-z0-9]+", s["question"].lower()))
        assert not question_words & set(s["perception_words"]), (s["question"], s["solution"])
        if s["kind"].endswith("_color"):
            assert s["answer"] in COLORS and s["answer"] in s["perception_words"]
        else:
            assert s["answer"].isdigit() and s["answer"] == s["perception_words"][0]


def test_kinds_and_balance(samples: list[dict]) -> None:
    kinds = Counter(s["kind"] for s in samples)
    assert set(kinds) == set(synthetic.KINDS)
    assert min(kinds.values()) >= 25
    # A model that does not look is at chance: every answer of a kind about equally likely.
    many = generate_samples(2000, seed=11)
    expected = {
        "single_color": COLORS,
        "unique_color": COLORS,
        "leftmost_color": COLORS,
        "color_count": ("0", "1", "2", "3"),
        "total_count": ("1", "2", "3", "4", "5"),
    }
    for kind, values in expected.items():
        answers = Counter(s["answer"] for s in many if s["kind"] == kind)
        assert set(answers) == set(values), kind
        share = max(answers.values()) / sum(answers.values())
        assert share < 1.5 / len(values), (kind, answers)


def test_region_targets(samples: list[dict]) -> None:
    for s in samples[:40]:
        targets = region_targets(s["shapes"], s["image"])
        assert targets.shape == (16, 2 * len(COLORS) + len(SHAPES))
        pixels = np.asarray(s["image"]).astype(int)
        for region in range(16):
            row, col = divmod(region, 4)
            cell = pixels[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28].reshape(-1, 3)
            for i, color in enumerate(COLORS):
                shown = (cell == np.array(synthetic.RGB[color])).all(-1).any()
                assert targets[region, i] == shown
        centred = targets[:, len(COLORS) : len(COLORS) + len(SHAPES)]
        assert centred.sum() <= len(s["shapes"])  # two centres in one region share it
        for sh in s["shapes"]:
            region = (sh["y"] // 28) * 4 + sh["x"] // 28
            assert targets[region, len(COLORS) + SHAPES.index(sh["shape"])] == 1
            assert targets[region, len(COLORS) + len(SHAPES) + COLORS.index(sh["color"])] == 1


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
    assert {"leftmost", "shapes", "0", "5"} <= set(texts[0].split())
