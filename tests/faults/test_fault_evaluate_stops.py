"""``cppo evaluate`` stopped part way: a SIGTERM stops it after a whole unit (exit 143, with the
command that continues it), a write cut by a kill costs one rerun, not two, and a damaged line
that no kill could leave is refused by name."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cppo_lightning.evaluation.command import main
from cppo_lightning.evaluation.report import append_records, read_records
from tests.e2e.test_evaluate import small_synthetic

REPO = Path(__file__).resolve().parents[2]
MODEL = "builtin:tiny-qwen2.5-vl"
# 6 prompts in units of 2 prompts x 2 samples: 3 units of 4 responses.
ARGS = ("--samples", "2", "--batch-size", "2", "--no-progress-bar")
UNIT = 4


def _evaluate(eval_file: str, output: Path, *extra: str) -> dict:
    payload = main([MODEL, "--eval", eval_file, "--output", str(output), *ARGS, *extra])
    assert payload is not None
    return payload


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """The set file, the output folder and the payload of an evaluation run to its end."""
    root = tmp_path_factory.mktemp("uninterrupted-eval")
    eval_file = small_synthetic(root, rows=6)
    return eval_file, root / "out", _evaluate(eval_file, root / "out")


def _cppo(command: str) -> subprocess.CompletedProcess:
    """Run a printed ``cppo ...`` command line as its own process (``python -m cppo_lightning.cli``
    is the ``cppo`` script)."""
    words = shlex.split(command)
    assert words[0] == "cppo", command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cppo_lightning.cli", *words[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )


def test_sigterm_stops_after_a_whole_unit_exits_143_and_the_same_command_continues(
    tmp_path, uninterrupted
):
    """Promise: a SIGTERM while unit 2 of 3 is sampled ends ``cppo evaluate`` once that unit is
    written, with exit status 143 and ``Continue with: <the same command>`` on stderr;
    ``responses.jsonl`` then holds units 1 and 2 whole (8 lines), and running that command
    completes with the results of an uninterrupted run. (Lightning's predict loop logged the
    SIGTERM and ran to the end with status 0.)"""
    eval_file, _, full = uninterrupted
    out = tmp_path / "out"
    engine_args = json.dumps({"marker": str(tmp_path / "sigterm-sent"), "call": 2})
    engine = ("--engine", "tests.helpers.engines.SigtermOnce", "--engine-args", engine_args)
    command = shlex.join(
        ["cppo", "evaluate", MODEL, "--eval", eval_file, "--output", str(out), *ARGS, *engine]
    )
    stopped = _cppo(command)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"Continue with: {command}" in stopped.stderr
    text = (out / "responses.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2 * UNIT
    assert not (out / "results.json").exists()

    continued = _cppo(command)
    assert continued.returncode == 0, continued.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert results == json.loads(json.dumps(full["results"]))
    assert len((out / "responses.jsonl").read_text().splitlines()) == 3 * UNIT


def test_a_cut_last_line_costs_one_rerun_not_two(tmp_path, uninterrupted, capfd):
    """Promise: a ``responses.jsonl`` whose last line was cut by a kill in the middle of a write
    (here: unit 1 whole, then the first 25 characters of unit 2's first line) is finished by one
    rerun of the same command, with the results of an uninterrupted run; the fragment is cut off
    (said on stderr) before the rerun appends. (The rerun glued its first record onto the
    fragment, lost it and failed with "lacks responses"; only a third run completed.)"""
    eval_file, full_out, full = uninterrupted
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(full_out / "run.json", out / "run.json")
    lines = (full_out / "responses.jsonl").read_text().splitlines(keepends=True)
    whole = "".join(lines[:UNIT])
    (out / "responses.jsonl").write_text(whole + lines[UNIT][:25])
    again = _evaluate(eval_file, out)
    assert again["results"] == full["results"]
    assert "dropped its cut last line" in capfd.readouterr().err
    text = (out / "responses.jsonl").read_text()
    assert text.startswith(whole) and len(text.splitlines()) == 3 * UNIT


def test_appending_after_a_cut_last_line_starts_on_a_line_of_its_own(tmp_path):
    """Promise: ``append_records`` cuts off a last line without its newline, or one that is not
    a record (a crash can leave NUL bytes), before it writes; ``read_records`` skips such a last
    line. (The new record was glued onto the fragment and both were lost.)"""
    path = tmp_path / "responses.jsonl"
    first = {"benchmark": "b", "images": "original", "prompt_id": "1", "sample": 0}
    second = {**first, "prompt_id": "2"}
    whole = json.dumps(first) + "\n"
    for cut in (json.dumps(second)[:20], "\0\0\0\n"):
        path.write_text(whole + cut)
        assert list(read_records(path)) == [("b", "original", "1", 0)]
        append_records(path, [second])
        assert path.read_text() == whole + json.dumps(second) + "\n"


def test_a_damaged_line_in_the_middle_is_refused_naming_the_file_and_line(
    tmp_path, uninterrupted, capsys
):
    """Promise: a line that does not parse with more lines after it is not a kill's cut (appends
    are whole lines): ``cppo evaluate`` refuses the folder before loading the model, naming the
    file and the line, and leaves the file as it was. (The line was skipped, and its responses
    scored again, without a word.)"""
    eval_file, full_out, _ = uninterrupted
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(full_out / "run.json", out / "run.json")
    lines = (full_out / "responses.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:30] + "\n"
    damaged = "".join(lines[: 2 * UNIT])
    (out / "responses.jsonl").write_text(damaged)
    with pytest.raises(SystemExit) as refused:
        main([MODEL, "--eval", eval_file, "--output", str(out), *ARGS])
    message = str(refused.value)
    assert f"{out / 'responses.jsonl'}: line 3 is not a whole response record" in message
    assert (out / "responses.jsonl").read_text() == damaged
    with pytest.raises(ValueError, match="line 3"):
        read_records(out / "responses.jsonl")
