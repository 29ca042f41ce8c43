"""The arithmetic and tables of `cppo study` (cppo_lightning.study.report) and its settings check
(cppo_lightning.study.settings), on hand-made records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cppo_lightning.errors import ConfigError
from cppo_lightning.study.report import (
    aggregate,
    greedy_table,
    t_cdf_two_sided,
    t_interval,
    t_quantile,
    to_markdown,
)
from cppo_lightning.study.runs import (
    first,
    greedy_figures,
    last,
    merge_attempts,
    read_record,
    resume_checkpoint,
)
from cppo_lightning.study.settings import (
    check_settings,
    compare_settings,
    resolve_methods,
    study_settings,
)


def test_t_quantile_matches_the_closed_forms():
    # df 1 (Cauchy): P(|T| <= t) = 2 atan(t) / pi = 0.95  =>  t = tan(0.475 pi) = 12.7062047...
    assert t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    # df 2: P(|T| <= t) = t / sqrt(t^2 + 2) = 0.95  =>  t^2 = 2 * 0.95^2 / (1 - 0.95^2)
    #       = 1.805 / 0.0975 = 18.51282...  =>  t = 4.3026527...
    assert t_quantile(2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-9)
    # Larger df against the printed tables (3 decimals), and towards the normal 1.960.
    for df, table in ((3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(df) == pytest.approx(table, abs=5e-4)
    assert 1.96 < t_quantile(1000) < 1.963
    # The CDF is a probability, increasing in t.
    assert t_cdf_two_sided(0.0, 5) == 0.0
    assert t_cdf_two_sided(1.0, 5) < t_cdf_two_sided(2.0, 5) < 1.0


def test_t_interval_by_hand():
    # [0.2, 0.4]: mean 0.3, sd = sqrt(((-0.1)^2 + 0.1^2) / 1) = 0.141421, n = 2, df = 1:
    # half = tan(0.475 pi) * 0.141421 / sqrt(2) = 12.7062 * 0.1 = 1.27062.
    two = t_interval([0.2, 0.4])
    assert two["mean"] == pytest.approx(0.3)
    assert two["half_width"] == pytest.approx(1.270620, abs=1e-6)
    assert (two["low"], two["high"]) == pytest.approx((0.3 - 1.270620, 0.3 + 1.270620), abs=1e-6)
    # [1, 2, 3]: mean 2, sd 1, df 2: half = 4.3026527 * 1 / sqrt(3) = 2.4841377.
    three = t_interval([1, 2, 3])
    assert three["half_width"] == pytest.approx(2.4841377, abs=1e-6)
    assert three["n"] == 3 and three["values"] == [1.0, 2.0, 3.0]
    # One value: a mean and no interval; none: nothing.
    one = t_interval([0.5])
    assert one["mean"] == 0.5 and one["half_width"] is None and one["low"] is None
    assert t_interval([])["mean"] is None


def _record(method: str, seed: int, accuracy: float, **figures: float | None) -> dict:
    return {
        "method": method,
        "seed": seed,
        "status": "finished",
        "log_dir": f"runs/{method}-seed{seed}/lightning_logs/version_0",
        "eval": {
            "original": {"accuracy": accuracy, "ci95": [accuracy - 0.1, accuracy + 0.1]},
            "blank": {"accuracy": 0.1, "ci95": [0.0, 0.2], "gap": accuracy - 0.1},
            "shuffled": {"accuracy": 0.2, "ci95": [0.1, 0.3], "gap": accuracy - 0.2},
        },
        "figures": {
            "accuracy_original": accuracy,
            "gap_blank": accuracy - 0.1,
            "step_seconds": 2.0,
            **figures,
        },
    }


def test_aggregate_per_method_over_seeds():
    records = [
        _record("grpo", 1, 0.4),
        _record("cppo", 0, 0.5, greedy_gap_blank=0.25),
        _record("grpo", 0, 0.2, greedy_gap_blank=None),
        _record("cppo", 1, 0.7, greedy_gap_blank=float("nan")),
        {"method": "papo", "seed": 0, "status": "failed", "figures": {}},
    ]
    methods = aggregate(records)
    assert list(methods) == ["grpo", "cppo"]  # first seen; a failed run counts nowhere
    assert methods["grpo"]["seeds"] == [0, 1]
    grpo = methods["grpo"]["figures"]["accuracy_original"]
    assert grpo["values"] == [0.2, 0.4] and grpo["mean"] == pytest.approx(0.3)
    assert grpo["half_width"] == pytest.approx(1.270620, abs=1e-6)  # as by hand above
    assert methods["cppo"]["figures"]["gap_blank"]["mean"] == pytest.approx(0.5)
    # A missing or non-finite figure is left out of that figure only.
    assert methods["cppo"]["figures"]["greedy_gap_blank"]["values"] == [0.25]
    assert methods["grpo"]["figures"]["greedy_gap_blank"]["n"] == 0
    assert methods["grpo"]["figures"]["step_seconds"]["half_width"] == 0.0


def test_markdown_tables_hold_every_run_and_method():
    records = [_record("grpo", 0, 0.2), _record("grpo", 1, 0.4), _record("cppo", 0, 0.5)]
    records.append(
        {"method": "cppo", "seed": 1, "status": "failed", "error": "cppo fit failed", "log": "L"}
    )
    study = {
        "settings": {
            "configs": [{"path": "configs/base.yaml", "sha256": "0" * 64}],
            "pass_through": ["--trainer.max_steps=4"],
            "samples": 4,
            "temperature": 1.0,
            "eval_set": {"value": "configs/eval/synthetic.yaml", "sha256": None},
        },
        "methods": ["grpo", "cppo"],
        "runs": records,
        "per_method": aggregate(records),
    }
    text = to_markdown(study)
    rows = [line for line in text.splitlines() if line.startswith("| grpo") or "| cppo" in line]
    # Per method: grpo over 2 seeds, 30.0 [-97.1, 157.1] = 0.3 +- 1.2706 in percent.
    assert "| grpo | 0 1 | 30.0 [-97.1, 157.1] |" in text
    assert "| cppo | 0 | 50.0 |" in text  # one seed: no interval
    # Per run: the avg@4 with its interval over prompts, the gaps in points.
    assert "| grpo | 0 | 20.0 [10.0-30.0] | 10.0 [0.0-20.0] | 20.0 [10.0-30.0] | +10.0 |" in text
    assert "| cppo | 1 | failed |" in text
    assert "- cppo seed 1: failed (cppo fit failed); log: L" in text
    assert "avg@4 original" in text and "`--trainer.max_steps=4`" in text
    assert len(rows) == 2 + 4


def test_merge_attempts_keeps_the_steps_before_a_resume():
    first = {"val/accuracy": [(0, 0.1), (4, 0.2)], "train/kl": [(1, 1.0), (2, 2.0), (5, 5.0)]}
    resumed = {"val/accuracy": [(4, 0.25), (8, 0.3)], "train/kl": [(5, 5.5), (6, 6.0)]}
    merged = merge_attempts([first, resumed, {}])
    assert merged["val/accuracy"] == [(0, 0.1), (4, 0.25), (8, 0.3)]
    assert merged["train/kl"] == [(1, 1.0), (2, 2.0), (5, 5.5), (6, 6.0)]
    restarted = {"val/accuracy": [(0, 0.5)]}
    assert merge_attempts([first, restarted]) == {"val/accuracy": [(0, 0.5)]}


def _settings(tmp_path: Path, *, base: str = "a: 1\n", flags=("--trainer.max_steps=4",), **kw):
    config = tmp_path / "base.yaml"
    config.write_text(base)
    overlay = tmp_path / "grpo.yaml"
    overlay.write_text(kw.pop("overlay", "model: {perception_loss: null}\n"))
    methods = resolve_methods([str(overlay), "cppo"], cwd=tmp_path)
    values = {"samples": 4, "temperature": 1.0, "eval_set": "x.yaml", "eval_batch_size": 16}
    values.update(kw)
    return study_settings([config], methods, list(flags), **values)


def test_settings_mismatch_is_found_and_refused(tmp_path):
    same = _settings(tmp_path)
    assert compare_settings(same, _settings(tmp_path)) == []
    flags = compare_settings(same, _settings(tmp_path, flags=["--trainer.max_steps=8"]))
    assert flags == [
        "pass-through flags: added --trainer.max_steps=8; left out --trainer.max_steps=4"
    ]
    (moved,) = compare_settings(
        _settings(tmp_path, flags=["--a=1", "--a=2"]), _settings(tmp_path, flags=["--a=2", "--a=1"])
    )
    assert (
        moved == "pass-through flags: the same flags in another order (--a=1 --a=2 -> --a=2 --a=1)"
    )
    (changed,) = compare_settings(same, _settings(tmp_path, base="a: 2\n"))
    assert changed.startswith("configs: ")
    assert compare_settings(same, _settings(tmp_path, samples=8)) == ["samples: 4 -> 8"]
    (overlay,) = compare_settings(same, _settings(tmp_path, overlay="model: {kl_coef: 0}\n"))
    assert overlay.startswith("method grpo: overlay") and "content differs" in overlay

    # On disk: the same settings continue the study, with a new method added to it.
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study-settings.json").write_text(json.dumps(same))
    more = _settings(tmp_path)
    more["overlays"]["dapo"] = None
    assert list(check_settings(tmp_path / "study", more)["overlays"]) == ["grpo", "cppo", "dapo"]
    with pytest.raises(ConfigError, match=r"added --trainer.max_steps=8.*another --output"):
        check_settings(tmp_path / "study", _settings(tmp_path, flags=["--trainer.max_steps=8"]))


def test_unknown_method_is_refused_listing_the_overlays(tmp_path):
    experiments = tmp_path / "configs" / "experiments"
    experiments.mkdir(parents=True)
    (experiments / "zzz-local.yaml").write_text("{}\n")
    (method,) = resolve_methods(["zzz-local"], cwd=tmp_path)
    assert method.overlay == (experiments / "zzz-local.yaml").resolve()
    with pytest.raises(ConfigError, match=r"nosuch: unknown method.*grpo.*zzz-local"):
        resolve_methods(["cppo", "nosuch"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="given twice"):
        resolve_methods(["cppo", "cppo"], cwd=tmp_path)


def test_a_finished_run_stays_finished_when_the_study_moves(tmp_path):
    run_dir = tmp_path / "moved" / "runs" / "grpo-seed0"
    version = run_dir / "lightning_logs" / "version_1"
    record = {
        "method": "grpo",
        "seed": 0,
        "status": "finished",
        "log_dir": "/elsewhere/runs/grpo-seed0/lightning_logs/version_1",
        "attempts": ["/elsewhere/runs/grpo-seed0/lightning_logs/version_0"],
    }
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(record))
    assert read_record(run_dir) is None  # no policy, no evaluation: not finished
    (version / "hf_policy").mkdir(parents=True)
    (version / "hf_policy" / "config.json").write_text("{}")
    assert read_record(run_dir) is None
    (version / "eval").mkdir()
    (version / "eval" / "results.json").write_text("{}")
    found = read_record(run_dir)
    assert found is not None and found["log_dir"] == str(version)
    assert found["attempts"] == [str(run_dir / "lightning_logs" / "version_0")]
    (run_dir / "run.json").write_text('{"status": "finished", "log_')  # cut: not finished
    assert read_record(run_dir) is None


@pytest.mark.parametrize("plots", [True, False])
def test_report_files_and_plots_or_the_line_that_says_they_were_skipped(
    tmp_path, monkeypatch, capsys, plots
):
    from cppo_lightning.study import plots as plot_module
    from cppo_lightning.study.command import write_report

    if not plots:
        monkeypatch.setattr(plot_module, "have_matplotlib", lambda: False)
    settings = {
        "configs": [{"path": "configs/base.yaml", "sha256": "0" * 64}],
        "pass_through": [],
        "samples": 4,
        "temperature": 1.0,
        "eval_set": {"value": "configs/eval/synthetic.yaml", "sha256": None},
        "overlays": {"grpo": None, "papo": None, "cppo": None},
    }
    records = [_record("grpo", s, 0.2 + 0.1 * s) for s in (0, 1)] + [_record("cppo", 0, 0.5)]
    for r in records:
        r["curves"] = {"val/accuracy": [[0, 0.1], [2, 0.2 + r["seed"] / 10]]}
    write_report(tmp_path, settings, records)
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["methods"] == ["grpo", "cppo"]  # papo has no run
    assert study["per_method"]["grpo"]["figures"]["accuracy_original"]["n"] == 2
    assert "| grpo | 0 1 |" in (tmp_path / "study.md").read_text()
    out = capsys.readouterr().out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if plots:
        assert pngs == ["accuracy.png", "gap.png"]
    else:
        assert pngs == [] and "plots skipped: matplotlib is not installed" in out
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    if plots:  # with the Evaluation callback's greedy curves, greedy.png too
        records[0]["curves"]["eval/shortcut-counter/original/accuracy"] = [[0, 0.5], [2, 0.4]]
        write_report(tmp_path, settings, records)
        assert sorted(p.name for p in tmp_path.glob("*.png")) == [
            "accuracy.png",
            "gap.png",
            "greedy.png",
        ]


def test_a_cut_run_resumes_from_its_newest_stop_or_last_checkpoint(tmp_path):
    import os

    logs = tmp_path / "lightning_logs"
    assert resume_checkpoint(tmp_path) is None  # nothing yet: start again
    files = {
        "version_0/checkpoints/last.ckpt": 100,
        "version_0/checkpoints/step=200.ckpt": 400,  # last.ckpt is saved with these
        "version_1/checkpoints/interrupted-step=250.ckpt": 300,  # Ctrl-C of the resumed attempt
        "version_1/checkpoints/reward-failure-step=260.ckpt": 500,  # not resumed from
    }
    for name, mtime in files.items():
        path = logs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    assert resume_checkpoint(tmp_path) == logs / "version_1/checkpoints/interrupted-step=250.ckpt"
    newest = logs / "version_2/checkpoints/preempted-step=270.ckpt"
    newest.parent.mkdir(parents=True)
    newest.write_bytes(b"")
    assert resume_checkpoint(tmp_path) == newest


def test_the_start_of_a_curve_is_its_step_0_value_or_none():
    # A run cut before its first validation and resumed from step 0 logs val/accuracy from
    # step 200 on: its first value is not the start and must not be reported as one.
    assert first([(0, 0.415), (200, 0.5)]) == 0.415
    assert first([(200, 0.515), (400, 0.53)]) is None
    assert first(None) is None and first([]) is None
    assert last([(200, 0.515), (400, 0.53)]) == 0.53


def test_greedy_figures_of_every_set_and_condition():
    scalars = {
        "eval/shortcut-counter/original/accuracy": [(0, 0.55), (200, 0.40), (600, 0.30)],
        "eval/shortcut-counter/blank/accuracy": [(0, 0.23), (600, 0.05)],
        "eval/shortcut-counter/blank/gap": [(0, 0.32), (600, 0.25)],
        "eval/shortcut/original/accuracy": [(200, 0.70), (600, 0.80)],  # no step 0: no start
        "val/accuracy": [(0, 0.4)],
    }
    f = greedy_figures(scalars)
    assert f["greedy/shortcut-counter/original/accuracy_first"] == 0.55
    assert f["greedy/shortcut-counter/original/accuracy_last"] == 0.30
    # end minus start: a drop is negative
    assert f["greedy/shortcut-counter/original/accuracy_change"] == pytest.approx(-0.25)
    assert f["greedy/shortcut-counter/blank/accuracy_change"] == pytest.approx(-0.18)
    assert f["greedy/shortcut-counter/blank/gap_change"] == pytest.approx(-0.07)
    assert f["greedy/shortcut/original/accuracy_first"] is None
    assert f["greedy/shortcut/original/accuracy_change"] is None
    assert f["greedy/shortcut/original/accuracy_last"] == 0.80
    assert not any(k.startswith("greedy/shortcut/original/gap") for k in f)
    assert not any("val" in k for k in f)


def test_greedy_table_rows_per_method_and_set():
    def greedy(start: float, end: float) -> dict:
        return {
            "greedy/counter/original/accuracy_first": start,
            "greedy/counter/original/accuracy_last": end,
            "greedy/counter/original/accuracy_change": end - start,
        }

    records = [
        _record("grpo", 0, 0.5, **greedy(0.6, 0.2)),
        _record("grpo", 1, 0.5, **greedy(0.6, 0.4)),
        _record("cppo", 0, 0.5, **greedy(0.6, 0.7)),
    ]
    text = greedy_table(aggregate(records))
    lines = text.splitlines()
    assert lines[0] == "| method | set | original start -> end | original change |"
    # grpo: end 0.2 and 0.4 -> 30.0; change -0.4 and -0.2 -> -30.0 +- 12.7062 * 0.1414 / 1.414
    assert lines[2] == "| grpo | counter | 60.0 -> 30.0 | -30.0 [-157.1, +97.1] |"
    assert lines[3] == "| cppo | counter | 60.0 -> 70.0 | +10.0 |"
    assert greedy_table(aggregate([_record("grpo", 0, 0.5)])) == ""


def test_a_second_study_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    from cppo_lightning.study.command import main, study_lock

    output = tmp_path / "study"
    with study_lock(output):
        assert "pid " in (output / "study.lock").read_text()
        with pytest.raises(ConfigError, match="another cppo study is running on this folder"):
            main(["--config", "configs/base.yaml", "--methods", "grpo", "--output", str(output)])
        with pytest.raises(ConfigError, match="another cppo study is running"), study_lock(output):
            pass
    with study_lock(output):  # released when the first ended
        pass


def test_an_archived_run_is_named_with_the_commit_that_made_it_not_a_missing_folder():
    from cppo_lightning.study.report import runs_table

    here = {**_record("grpo", 0, 0.2), "log_dir": "runs/s/runs/grpo-seed0/lightning_logs/version_0"}
    made = {
        **_record("grpo", 1, 0.2),
        "archived": True,
        "code": {"commit": "5657541" + "0" * 33, "dirty": True},
    }
    bare = {**_record("grpo", 2, 0.2), "archived": True, "code": None}
    cells = [
        line.rsplit("|", 2)[1].strip()
        for line in runs_table([here, made, bare], 4).splitlines()[2:]
    ]
    assert cells == [
        "runs/s/runs/grpo-seed0/lightning_logs/version_0",
        "archived, made at 5657541+",
        "archived",
    ]
