"""benchmarks/gpu_check.py's part runner and figures: a timeout kills the part's whole process
group, an out-of-memory or an error is a status, and the figures are read from PhaseTimer's
lines as documented (first rollout batch dropped, a cut run's finished calls kept)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from benchmarks.gpu_check import classify, run_part
from benchmarks.gpu_check_report import FIGURES, fit_figures, mismatch_checks

OOM = (
    "Traceback (most recent call last):\n"
    '  File "update.py", line 1, in backward\n'
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total "
    "capacity of 79.10 GiB\n"
)


def test_classify():
    assert classify(0, "any output, even CUDA out of memory in a warning") == ("ok", "")
    status, message = classify(1, OOM)
    assert status == "oom" and message.startswith("torch.OutOfMemoryError: CUDA out of memory")
    status, message = classify(1, "Traceback ...\nValueError: model.kl_coef must be >= 0\n")
    assert (status, message) == ("error", "ValueError: model.kl_coef must be >= 0")
    assert classify(2, "error: unknown flag --x\nusage: cppo") == (
        "error",
        "error: unknown flag --x",
    )
    assert classify(137, "") == ("error", "exit status 137")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_a_timeout_kills_the_part_and_what_it_started(tmp_path):  # type: ignore[no-untyped-def]
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    status, message, seconds = run_part([sys.executable, "-c", script], 2, tmp_path / "log")
    assert status == "timeout" and "budget of 2 s" in message
    assert seconds < 20 and time.monotonic() - start < 20
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    log = (tmp_path / "log").read_text()
    assert log.startswith("$ ") and "started" in log  # the command line, then its output


def test_an_out_of_memory_is_a_status_with_the_line(tmp_path):  # type: ignore[no-untyped-def]
    script = f"import sys; sys.stderr.write({OOM!r}); sys.exit(1)"
    status, message, _ = run_part([sys.executable, "-c", script], 30, tmp_path / "log")
    assert status == "oom" and "Tried to allocate 2.32 GiB" in message


def test_the_part_runs_offline(tmp_path):  # type: ignore[no-untyped-def]
    script = "import os; print(os.environ['HF_HUB_OFFLINE'], os.environ['OMP_NUM_THREADS'])"
    env = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        status, _, _ = run_part([sys.executable, "-c", script], 30, tmp_path / "log", threads=1)
    finally:
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env
    assert status == "ok" and (tmp_path / "log").read_text().splitlines()[-1] == "1 1"


def _phases(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _call(batch: int, phase: str, seconds: float, peak: float | None, **extra: float) -> dict:
    return {"event": "phase", "batch": batch, "phase": phase, "seconds": seconds,
            "peak_gib": peak, "rss_gib": 0.5, **extra}  # fmt: skip


def test_figures_drop_the_first_rollout_batch_and_keep_every_peak(tmp_path):  # type: ignore[no-untyped-def]
    start = {"event": "start", "device": "NVIDIA H100", "trainable_parameters": 7}
    records = [start]
    for batch, scale in ((0, 10.0), (1, 1.0), (2, 3.0)):  # batch 0: warm-up, 10x slower
        records += [
            _call(batch, "views", 0.1 * scale, 1.0),
            _call(batch, "generate", 2.0 * scale, 30.0, tokens=1000),
            _call(batch, "logp", 1.0 * scale, 20.0 if batch else 50.0),  # the peak is batch 0's
            _call(batch, "update", 2.0 * scale, 40.0),  # two mini-batches per step
            _call(batch, "update", 2.0 * scale, 41.0),
            _call(batch, "step", 5.5 * scale, 45.0),
            {"event": "batch_end", "batch": batch},
        ]
    figures = fit_figures(_phases(tmp_path / "p.jsonl", records), tmp_path / "no-run")
    assert figures.pop("device") == "NVIDIA H100"
    assert set(figures) == set(FIGURES)
    # Batches 1 and 2 (scales 1 and 3, mean 2): per-batch sums, averaged.
    assert figures["generate_s"] == pytest.approx(4.0)
    assert figures["generate_tokens_per_s"] == pytest.approx(2000 / 8.0)
    assert figures["update_s"] == pytest.approx(11.0 - 2.0)  # step - logp
    assert figures["views_s"] == pytest.approx(0.2)
    assert figures["logp_peak_gib"] == 50.0 and figures["update_peak_gib"] == 41.0
    assert figures["peak_gib"] == 50.0
    assert figures["rollout_batches_timed"] == 2 and figures["trainable_parameters"] == 7
    assert figures["logp_mismatch"] is None  # no TensorBoard run: not measured


def test_a_cut_run_reports_the_calls_it_finished(tmp_path):  # type: ignore[no-untyped-def]
    records = [
        {"event": "start", "device": "cpu", "trainable_parameters": 1},
        _call(0, "views", 0.5, None),
        _call(0, "generate", 100.0, None, tokens=4096 * 64),
    ]  # killed in the update of the first batch
    figures = fit_figures(_phases(tmp_path / "p.jsonl", records), tmp_path / "no-run")
    assert figures["rollout_batches_timed"] == 0
    assert figures["generate_tokens_per_s"] == pytest.approx(4096 * 64 / 100.0)
    assert figures["update_s"] is None and figures["step_s"] is None
    assert figures["peak_gib"] == 0.5  # on a CPU: the peak resident memory


def test_logp_mismatch_is_checked_against_its_precision():
    row = {"settings": {"precision": "bf16-mixed"}, "figures": {"logp_mismatch": 0.01}}
    report = {"parts": {"lora-1024": row, "build": {"settings": {}, "figures": None}}}
    (check,) = mismatch_checks(report)
    assert check == {
        "name": "rollout/logp_mismatch of lora-1024 (bf16-mixed)",
        "value": 0.01,
        "tolerance": 5e-2,
        "passed": True,
    }


def test_without_cuda_the_full_check_refuses_to_start(capsys):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--output", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    assert "no CUDA device here: --tiny" in capsys.readouterr().err
