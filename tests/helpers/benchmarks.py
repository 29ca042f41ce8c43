"""Small local files in the layouts of the paper's benchmarks (from their dataset cards), so that
each ``configs/eval/*.yaml`` can be read offline. Every layout has one multiple-choice or
free-form row of each kind it uses, and one row whose image does not decode."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

BROKEN = {"bytes": b"this is not an image", "path": None}


def png(color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _write(path: Path, rows: list[dict[str, Any]], images: tuple[str, ...]) -> Path:
    features = datasets.Dataset.from_list(
        [{k: v for k, v in row.items() if k not in images} for row in rows]
    ).features
    for name in images:
        value = rows[0][name]
        features[name] = (
            datasets.List(datasets.Image()) if isinstance(value, list) else datasets.Image()
        )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def mathvista(root: Path) -> Path:
    meta = {"category": "math-targeted-vqa", "task": "figure question answering", "grade": "x"}
    common = {"unit": None, "precision": None, "image": "images/1.jpg", "query": "q"}
    rows = [
        {
            **common,
            "pid": "1",
            "question": "Which number is largest?",
            "decoded_image": png((200, 0, 0)),
            "choices": ["3", "4", "5"],
            "answer": "5",
            "question_type": "multi_choice",
            "answer_type": "text",
            "metadata": meta,
        },
        {
            **common,
            "pid": "2",
            "question": "What fraction is shaded?",
            "decoded_image": png((0, 200, 0)),
            "choices": None,
            "answer": "0.5",
            "question_type": "free_form",
            "answer_type": "float",
            "precision": 1.0,
            "metadata": {**meta, "task": "math word problem"},
        },
        {
            **common,
            "pid": "3",
            "question": "Broken?",
            "decoded_image": BROKEN,
            "choices": None,
            "answer": "1",
            "question_type": "free_form",
            "answer_type": "integer",
            "metadata": meta,
        },
    ]
    return _write(root / "mathvista.parquet", rows, ("decoded_image",))


def mathverse(root: Path) -> Path:
    meta = {
        "split": "testmini",
        "source": "GeoQA",
        "subject": "Plane Geometry",
        "subfield": "Angle",
    }
    rows = [
        {
            "sample_index": "1",
            "problem_index": "1",
            "problem_version": "Text Dominant",
            "question": "Find the angle.\nChoices:\nA:30\nB:60\nC:90",
            "image": png((0, 0, 200)),
            "answer": "B",
            "question_type": "multi-choice",
            "query_wo": "x",
            "query_cot": "x",
            "metadata": meta,
        },
        {
            "sample_index": "2",
            "problem_index": "1",
            "problem_version": "Vision Only",
            "question": "",
            "image": png((0, 0, 100)),
            "answer": "12",
            "question_type": "free-form",
            "query_wo": "x",
            "query_cot": "x",
            "metadata": meta,
        },
        {
            "sample_index": "3",
            "problem_index": "2",
            "problem_version": "Vision Only",
            "question": "?",
            "image": BROKEN,
            "answer": "1",
            "question_type": "free-form",
            "query_wo": "x",
            "query_cot": "x",
            "metadata": meta,
        },
    ]
    return _write(root / "mathverse.parquet", rows, ("image",))


def wemath(root: Path) -> Path:
    common = {
        "split": "testmini",
        "key": "2steps_1",
        "question number": 1,
        "knowledge concept description": "d",
    }
    rows = [
        {
            **common,
            "ID": "2steps_1",
            "knowledge concept": "Area of circles",
            "question": "What is the area?",
            "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer",
            "answer": "B",
            "image_path": png((50, 50, 50)),
        },
        {
            **common,
            "ID": "2steps_1",  # shared with its composite question, as in WeMath
            "key": "2steps_multi",
            "knowledge concept": "Perimeter",
            "question": "And the perimeter?",
            "option": "A. 12;B. 14",
            "answer": "A",
            "image_path": png((60, 60, 60)),
        },
        {
            **common,
            "ID": "3",
            "knowledge concept": "Perimeter",
            "question": "?",
            "option": "A. 1;B. 2",
            "answer": "A",
            "image_path": BROKEN,
        },
    ]
    return _write(root / "wemath.parquet", rows, ("image_path",))


def logicvista(root: Path) -> Path:
    common = {
        "reasoning": "r",
        "broad_capability": "b",
        "specific_capability": "s",
        "imagesource": "i",
        "sourcelink": "l",
        "liscenced": "yes",
    }
    rows = [
        {
            **common,
            "id": "a",
            "question": "Which two? A. x B. y C. z",
            "answer": "A, C",
            "image": png((10, 10, 10)),
            "skill": "inductive",
        },
        {
            **common,
            "id": "b",
            "question": "Which one? A. x B. y",
            "answer": "B",
            "image": png((20, 20, 20)),
            "skill": "spatial",
        },
        {**common, "id": "c", "question": "?", "answer": "A", "image": BROKEN, "skill": "spatial"},
    ]
    return _write(root / "logicvista.parquet", rows, ("image",))


def dynamath(root: Path) -> Path:
    common = {"image": "images/1.png", "knowledge_level": "high school"}
    rows = [
        {
            **common,
            "id": "1",
            "question": "Which? A. 1 B. 2",
            "decoded_image": png((1, 2, 3)),
            "ground_truth": "A",
            "answer_type": "multiple choice",
            "subject": "graph theory",
        },
        {
            **common,
            "id": "1",
            "question": "Value of f(2)?",
            "decoded_image": png((3, 2, 1)),
            "ground_truth": "1/4",
            "answer_type": "float",
            "subject": "algebra",
        },
        {
            **common,
            "id": "2",
            "question": "?",
            "decoded_image": BROKEN,
            "ground_truth": "1",
            "answer_type": "float",
            "subject": "algebra",
        },
    ]
    return _write(root / "dynamath.parquet", rows, ("decoded_image",))


def mathvision(root: Path) -> Path:
    common = {"image": "images/1.jpg", "solution": None, "level": 2}
    rows = [
        {
            **common,
            "id": "1",
            "question": "<image1>Which shape?",
            "options": ["A", "B", "C", "D", "E"],
            "decoded_image": png((9, 9, 9)),
            "answer": "C",
            "subject": "metric geometry",
        },
        {
            **common,
            "id": "2",
            "question": "How many?",
            "options": [],
            "decoded_image": png((8, 8, 8)),
            "answer": "7",
            "subject": "counting",
        },
        {
            **common,
            "id": "3",
            "question": "?",
            "options": [],
            "decoded_image": BROKEN,
            "answer": "1",
            "subject": "counting",
        },
    ]
    return _write(root / "mathvision.parquet", rows, ("decoded_image",))


def mmmu_pro_vision(root: Path) -> Path:
    rows = [
        {
            "id": "validation_Art_1",
            "image": png((100, 0, 100)),
            "options": "['Monet', 'Manet', 'Degas']",
            "answer": "B",
            "subject": "Art",
        },
        {
            "id": "validation_Math_2",
            "image": png((0, 100, 100)),
            "options": "['1', '2']",
            "answer": "A",
            "subject": "Math",
        },
        {
            "id": "validation_Math_3",
            "image": BROKEN,
            "options": "['1']",
            "answer": "A",
            "subject": "Math",
        },
    ]
    return _write(root / "mmmu-pro-vision.parquet", rows, ("image",))


def geometry3k(root: Path) -> Path:
    rows = [
        {"images": [png((5, 5, 5))], "problem": "<image>Find x.", "answer": "12"},
        {"images": [png((6, 6, 6))], "problem": "<image>Find y.", "answer": "3\\sqrt{2}"},
        {"images": [BROKEN], "problem": "<image>Find z.", "answer": "1"},
    ]
    return _write(root / "geometry3k.parquet", rows, ("images",))


LAYOUTS = {
    "mathvista": mathvista,
    "mathverse": mathverse,
    "wemath": wemath,
    "logicvista": logicvista,
    "dynamath": dynamath,
    "mathvision": mathvision,
    "mmmu-pro-vision": mmmu_pro_vision,
    "geometry3k": geometry3k,
}
