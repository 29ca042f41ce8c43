"""``cppo evaluate`` as two DDP processes on CPU (Lightning's strategy, gloo): every prompt is
scored exactly once, and the results are those of one process, greedy and sampled alike (a
unit's samples are drawn from its own seed, whichever rank draws them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_evaluate import _run, small_synthetic

REPO = Path(__file__).resolve().parents[2]


def _two_processes(eval_file: str, output: Path, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "cppo_lightning.cli", "evaluate", "builtin:tiny-qwen2.5-vl",
        "--eval", eval_file, "--output", str(output), "--no-progress-bar",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "results.json").read_text())


def test_two_processes_score_each_prompt_once_with_the_numbers_of_one(tmp_path):
    eval_file = small_synthetic(tmp_path, rows=10)  # 3 batches of 4: the ranks get 2 and 1
    for name, extra in {
        "greedy": ("--samples", "1", "--temperature", "0", "--images", "original", "shuffled"),
        "sampled": ("--samples", "2", "--images", "original", "removing"),
    }.items():
        extra = (*extra, "--batch-size", "4")
        one = _run("builtin:tiny-qwen2.5-vl", eval_file, tmp_path / f"{name}-1", *extra)
        two = _two_processes(eval_file, tmp_path / f"{name}-2", *extra)
        assert two == json.loads(json.dumps(one)), name
        lines = (tmp_path / f"{name}-2" / "responses.jsonl").read_text().splitlines()
        keys = [(r["images"], r["prompt_id"], r["sample"]) for r in map(json.loads, lines)]
        assert len(keys) == len(set(keys)) == 10 * 2 * (2 if name == "sampled" else 1)
