"""`cppo study` end to end: real `cppo fit` and `cppo evaluate` subprocesses on the embedded
model, shrunk to seconds (tests/helpers/runs.py's sizes), through the console script's entry point
(`python -m cppo_lightning.cli study`) so that exit statuses are the user's."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cppo_lightning.cli import entry_point
from cppo_lightning.study.settings import resolve_methods, study_settings

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "base.yaml"
# cppo fit flags for every run: 2 steps on 6 training rows in batches of 2, 4 held-out rows,
# 16-token responses, a reward with variance in every group (as tests/helpers/runs.py's runs).
FAST = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--data.batch_size=2",
    "--model.mini_batch_size=null",
    "--data.dataset.init_args.num_train=6",
    "--data.dataset.init_args.num_val=4",
    "--rollout.max_new_tokens=16",
    "--model.val_samples=2",
    "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward}",
    "--model.reward.init_args.weights={length: 1.0}",
    "--model.val_accuracy_term=length",
    "--trainer.callbacks.num_rows=4",  # base.yaml's Evaluation callback on 4 prompts
]


def _eval_set(tmp_path: Path) -> Path:
    """configs/eval/synthetic.yaml on its first 4 rows with 16-token responses."""
    text = (REPO / "configs" / "eval" / "synthetic.yaml").read_text()
    path = tmp_path / "synthetic-4.yaml"
    path.write_text(text.replace("max_new_tokens: 48", "max_new_tokens: 16") + "num_rows: 4\n")
    return path


def _args(tmp_path: Path, *extra: str, methods=("grpo", "cppo")) -> list[str]:
    """``cppo study`` of ``methods`` x seed 0 into ``tmp_path/study`` on the shrunk runs."""
    return [
        "study",
        "--config",
        str(BASE),
        "--methods",
        *methods,
        "--seeds",
        "0",
        "--output",
        str(tmp_path / "study"),
        "--samples",
        "2",
        "--eval-batch-size",
        "4",
        "--eval-set",
        str(_eval_set(tmp_path)),
        *FAST,
        *extra,
    ]


def _study(tmp_path: Path, *extra: str, methods=("grpo", "cppo")) -> subprocess.CompletedProcess:
    """The console script, from the repository (so that the runs import tests.helpers)."""
    command = [
        sys.executable,
        "-m",
        "cppo_lightning.cli",
        *_args(tmp_path, *extra, methods=methods),
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


def _refused(tmp_path: Path, monkeypatch, capsys, *extra: str, methods=("grpo", "cppo")) -> str:  # type: ignore[no-untyped-def]
    """Run the console script's entry point in this process (no run may start) and return the
    one line it printed on stderr, checking the exit status 2."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["cppo", *_args(tmp_path, *extra, methods=methods)])
    with pytest.raises(SystemExit) as raised:
        entry_point()
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def _versions(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "lightning_logs").glob("version_*"))


def test_unknown_method_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, methods=("grpo", "no-such-method"))
    assert "no-such-method: unknown method" in err and "grpo" in err and "papo" in err
    assert not (tmp_path / "study").exists()


def test_other_settings_are_refused_with_what_differs(tmp_path, monkeypatch, capsys):
    # A study on disk made with 2 steps; this command asks for 3.
    output = tmp_path / "study"
    output.mkdir()
    methods = resolve_methods(["grpo", "cppo"], cwd=REPO)
    settings = study_settings([BASE], methods, FAST, 2, 1.0, str(_eval_set(tmp_path)), 4)
    (output / "study-settings.json").write_text(json.dumps(settings))
    err = _refused(tmp_path, monkeypatch, capsys, "--trainer.max_steps=3")
    assert "added --trainer.max_steps=3" in err and "another --output" in err
    assert not (output / "runs").exists()
    # The flags the study sets itself cannot be passed through.
    err = _refused(tmp_path, monkeypatch, capsys, "--seed_everything=3")
    assert "--seed_everything=3" in err


def test_an_archive_that_is_the_study_folder_or_a_file_is_refused(tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, monkeypatch, capsys, "--archive", str(tmp_path / "study"))
    assert "that is the study folder" in err
    (tmp_path / "file").write_text("x")
    err = _refused(tmp_path, monkeypatch, capsys, "--archive", str(tmp_path / "file"))
    assert "not a folder" in err
    assert not (tmp_path / "study").exists()


def test_a_failed_run_is_named_with_its_log_and_the_others_go_on(tmp_path):
    # model.kl_coef < 0 is refused by cppo fit before training: both runs fail, one after the other.
    done = _study(tmp_path, "--model.kl_coef=-1")
    assert done.returncode == 1, done.stdout + done.stderr
    for method in ("grpo", "cppo"):
        log = tmp_path / "study" / "runs" / f"{method}-seed0" / "fit.log"
        said = f"{method} seed 0: cppo fit failed (exit status 2); its log: {log} (last line: "
        assert said + "error: model.kl_coef must be >= 0" in done.stdout
        assert "kl_coef" in log.read_text()  # the run's own output, kept for diagnosis
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [(r["method"], r["status"]) for r in study["runs"]] == [
        ("grpo", "failed"),
        ("cppo", "failed"),
    ]


def _finite(value) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_study_trains_evaluates_compares_and_resumes(tmp_path):
    """Two methods, one seed: the report; a rerun skips both; a cut run is redone; other
    settings are refused."""
    done = _study(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    output = tmp_path / "study"
    study = json.loads((output / "study.json").read_text())
    assert study["methods"] == ["grpo", "cppo"] and study["seeds"] == [0]
    assert [(r["method"], r["seed"], r["status"]) for r in study["runs"]] == [
        ("grpo", 0, "finished"),
        ("cppo", 0, "finished"),
    ]
    for run in study["runs"]:
        assert Path(run["policy"], "config.json").is_file()
        for condition in ("original", "blank", "shuffled"):
            entry = run["eval"][condition]
            assert _finite(entry["accuracy"]) and entry["n"] == 4
            assert entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
        for name in (
            "accuracy_original",
            "gap_blank",
            "gap_shuffled",
            "greedy_gap_blank",
            "greedy_gap_shuffled",
            "val_accuracy_start",
            "val_accuracy_end",
            "step_seconds",
            "tokens_generated",
            "wall_seconds",
        ):
            assert _finite(run["figures"][name]), (run["method"], name, run["figures"][name])
        assert [step for step, _ in run["curves"]["val/accuracy"]] == [0, 2]
        # 2 rollout batches of 2 prompts x 8 responses, at most 16 tokens each.
        assert 0 < run["figures"]["tokens_generated"] <= 2 * 16 * 16
    per_method = study["per_method"]["cppo"]["figures"]["accuracy_original"]
    assert per_method["n"] == 1 and per_method["half_width"] is None  # one seed: no interval
    text = (output / "study.md").read_text()
    assert "| grpo | 0 |" in text and "| cppo | 0 |" in text and "avg@2 original" in text
    assert (output / "accuracy.png").stat().st_size > 0 and (output / "gap.png").stat().st_size > 0

    runs = {m: output / "runs" / f"{m}-seed0" for m in ("grpo", "cppo")}
    before = {m: _versions(d) for m, d in runs.items()}
    assert before == {"grpo": ["version_0"], "cppo": ["version_0"]}

    # A rerun trains nothing.
    done = _study(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("finished before, skipped") == 2
    assert {m: _versions(d) for m, d in runs.items()} == before

    # --archive copies the results only; a copy of the archive continues the study: its runs are
    # finished (archived), their records taken as written, and nothing is trained.
    archive = tmp_path / "archive"
    done = _study(tmp_path, "--archive", str(archive))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "archived 2 finished runs" in done.stdout
    assert sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file()) == [
        "accuracy.png",
        "gap.png",
        "greedy.png",
        "runs/cppo-seed0/run.json",
        "runs/grpo-seed0/run.json",
        "study-settings.json",
        "study.json",
        "study.md",
    ]
    archived = json.loads((archive / "study.json").read_text())
    assert [r["figures"] for r in archived["runs"]] == [r["figures"] for r in study["runs"]]
    continued = tmp_path / "continued"
    shutil.copytree(archive, continued)
    record_file = continued / "runs" / "grpo-seed0" / "run.json"
    record = json.loads(record_file.read_text())
    record["figures"]["accuracy_original"] = 0.125  # taken as written: not rebuilt from logs
    record_file.write_text(json.dumps(record))
    done = _study(tmp_path, "--output", str(continued))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("finished before, skipped") == 2 and "training" not in done.stdout
    assert not any(continued.rglob("lightning_logs"))
    again = json.loads((continued / "study.json").read_text())
    assert [r["figures"]["accuracy_original"] for r in again["runs"]] == [
        0.125,
        study["runs"][1]["figures"]["accuracy_original"],
    ]
    # An archive of a study with other settings is refused before anything runs.
    done = _study(
        tmp_path,
        "--trainer.max_steps=4",
        "--output",
        str(tmp_path / "s2"),
        "--archive",
        str(archive),
    )
    assert done.returncode == 2 and "added --trainer.max_steps=4" in done.stderr
    assert not (tmp_path / "s2").exists()

    # A cut run (no record, no export: killed while exporting) is redone from its last
    # checkpoint in a new version folder; the finished one is skipped; nothing is deleted.
    (runs["cppo"] / "run.json").unlink()
    policy = runs["cppo"] / "lightning_logs" / "version_0" / "hf_policy"
    shutil.rmtree(policy)
    done = _study(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "grpo seed 0: finished before, skipped" in done.stdout
    assert "cppo seed 0: training, resumed from" in done.stdout
    assert _versions(runs["grpo"]) == ["version_0"]
    assert len(_versions(runs["cppo"])) > 1
    assert (runs["cppo"] / "lightning_logs" / "version_0" / "eval" / "results.json").is_file()
    redone = json.loads((runs["cppo"] / "run.json").read_text())
    assert redone["log_dir"] != str(runs["cppo"] / "lightning_logs" / "version_0")
    # Its curves are the first attempt's (the resumed one trained no further step).
    assert [step for step, _ in redone["curves"]["val/accuracy"]] == [0, 2]
    assert _finite(redone["figures"]["val_accuracy_end"])

    # Other pass-through flags: refused, nothing run.
    done = _study(tmp_path, "--trainer.max_steps=4")
    assert done.returncode == 2
    assert "added --trainer.max_steps=4" in done.stderr
    assert _versions(runs["grpo"]) == ["version_0"]
