"""``cppo study``: methods x seeds on one config, each trained and evaluated alike, compared.

    cppo study --config configs/base.yaml --methods grpo papo cppo --seeds 0 1 2 \\
        --output runs/study [--jobs N] [any cppo fit flag, passed to every run]

Each (method, seed) is a ``cppo fit`` subprocess with the method's overlay into
``OUTPUT/runs/METHOD-seedSEED`` (its output in ``fit.log`` there), then ``cppo evaluate`` of the
policy it exported: avg@k (``--samples``, 4) at ``--temperature`` (1.0) under the original, blank
and shuffled images on ``--eval-set`` (``evaluate.log``). ``OUTPUT/study.json`` and ``study.md``
compare them (per run, and per method as the mean over seeds with a 95% t-interval) and
``accuracy.png``/``gap.png`` plot them. Rerunning the command skips finished runs and redoes cut
ones (resuming from their last checkpoint); a rerun with other settings is refused. SIGTERM (and
a SIGINT sent to the study alone) is passed on to the runs under way, which save and stop; no run
starts after it. See docs/study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cppo_lightning.errors import ConfigError
from cppo_lightning.study import runs as run_files
from cppo_lightning.study.processes import Children, stop_on_signals, study_lock
from cppo_lightning.study.report import aggregate, json_safe, to_markdown
from cppo_lightning.study.settings import (
    SETTINGS_FILE,
    Method,
    check_settings,
    resolve_methods,
    study_settings,
)

#: ``cppo fit`` flags the study sets for each run: refused among the pass-through flags.
OWN_FIT_FLAGS = ("--seed_everything", "--trainer.default_root_dir", "--ckpt_path", "--config")
#: The exit status of a study stopped by each signal: 128 + its number, as a shell reports it.
STOP_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}
_PRINT = threading.Lock()


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``cppo study``; any other flag is a ``cppo fit`` flag for every run."""
    parser = argparse.ArgumentParser(
        prog="cppo study",
        description=(__doc__ or "").split("\n\n")[0].strip(),
        epilog="Unknown flags (e.g. --trainer.max_steps=100) are passed to every cppo fit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a fit flag that starts like one of these must pass through
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="YAML",
        help="a cppo fit config, repeatable (in order); each method's overlay comes after them",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["grpo", "papo", "cppo"],
        metavar="METHOD",
        help="overlays of configs/experiments by name, cppo (no overlay) or YAML paths",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--output", default="runs/study", metavar="DIR", help="the study folder")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, the CPU threads shared out"
    )
    parser.add_argument("--samples", type=int, default=4, help="k of the held-out avg@k")
    parser.add_argument("--temperature", type=float, default=1.0, help="held-out sampling")
    parser.add_argument(
        "--eval-set",
        default="configs/eval/synthetic.yaml",
        metavar="SET",
        help="the held-out set, as cppo evaluate --eval takes it",
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=16, help="prompts per generate call in evaluation"
    )
    parser.add_argument(
        "--archive",
        metavar="DIR",
        help="after the report, copy the study's results to DIR: its settings, each finished "
        "run's run.json, the report and plots (no checkpoint, policy or log); a later cppo study "
        "--output on a copy of DIR continues the study, its runs archived (finished)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: write the report of the study's finished runs (its "
        "own settings are reported; this command's are not checked)",
    )
    return parser


@dataclass(frozen=True)
class Job:
    """One (method, seed) of the study."""

    method: Method
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.method.label} seed {self.seed}"


def say(text: str) -> None:
    """One line on stdout, whole, whichever run's thread says it."""
    with _PRINT:
        print(text, flush=True)


def thread_env(jobs: int) -> dict[str, str] | None:
    """The environment of one of ``jobs`` concurrent runs: the CPU's cores shared out evenly
    (None, the inherited environment, for one run at a time)."""
    if jobs <= 1:
        return None
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def cppo() -> list[str]:
    """The ``cppo`` console script of this interpreter, from any working directory."""
    return [sys.executable, "-m", "cppo_lightning.cli"]


def fit_command(
    job: Job, configs: list[Path], pass_through: list[str], ckpt: Path | None
) -> list[str]:
    """``cppo fit`` of one run: the configs, the method's overlay, the seed, the run folder, the
    pass-through flags, and ``--ckpt_path`` when it resumes a cut attempt."""
    command = [*cppo(), "fit"]
    for config in configs:
        command += ["--config", str(config)]
    if job.method.overlay is not None:
        command += ["--config", str(job.method.overlay)]
    command += [
        f"--seed_everything={job.seed}",
        f"--trainer.default_root_dir={job.run_dir}",
        "--trainer.enable_progress_bar=false",
        *pass_through,
    ]
    if ckpt is not None:
        command.append(f"--ckpt_path={ckpt}")
    return command


def evaluate_command(log_dir: Path, args: argparse.Namespace) -> list[str]:
    """``cppo evaluate`` of a run's exported policy into ``log_dir/eval``."""
    return [
        *cppo(),
        "evaluate",
        str(log_dir / run_files.POLICY),
        "--eval",
        args.eval_set,
        "--samples",
        str(args.samples),
        "--temperature",
        str(args.temperature),
        "--batch-size",
        str(args.eval_batch_size),
        "--images",
        *run_files.CONDITIONS,
        "--output",
        str(log_dir / run_files.EVAL_DIR),
        "--no-progress-bar",
    ]


def last_line(log: Path) -> str:
    """`` (last line: ...)`` of ``log``, empty when there is none."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" (last line: {lines[-1].strip()[:300]})" if lines else ""


def failed(job: Job, what: str, status: int | str, log: Path) -> dict[str, Any]:
    """The record of a run that did not finish, said on stdout with its log (and the log's last
    line, often the error)."""
    say(f"{job.name}: {what} failed ({status}); its log: {log}{last_line(log)}")
    return {
        "method": job.method.label,
        "seed": job.seed,
        "status": "failed",
        "error": f"{what} failed ({status})",
        "run_dir": str(job.run_dir),
        "log": str(log),
    }


def stopped(
    job: Job, what: str | None, status: int | None, log: Path | None, signum: signal.Signals
) -> dict[str, Any]:
    """The record of a run the study's stop cut: ``what`` (``cppo fit``, ...) ended with
    ``status``, or was not run (None); ``what`` None: the run did not start (no ``log``). Not
    finished and not failed: a rerun of the study continues it."""
    if what is None:
        error = f"not started: the study was stopped by {signum.name}"
    elif status is None:
        error = f"{what} not run: the study was stopped by {signum.name}"
    else:
        error = f"{what} stopped by {signum.name} (exit status {status})"
        say(f"{job.name}: {error}; its log: {log}")
    record = {
        "method": job.method.label,
        "seed": job.seed,
        "status": "stopped",
        "error": f"{error}; run the study again to continue",
        "run_dir": str(job.run_dir),
    }
    return record if log is None else {**record, "log": str(log)}


def export_resumed(
    job: Job, log: Path, env: dict[str, str] | None, children: Children
) -> Path | None:
    """The policy of a resumed run whose checkpoint was already at the end (Lightning then
    trains nothing and ExportPolicy, a train-end hook, does not run): ``cppo export`` of that
    checkpoint into the newest attempt's folder; that folder, or None when it fails."""
    tried = run_files.attempts(job.run_dir)
    ckpt = run_files.resume_checkpoint(job.run_dir)
    if not tried or ckpt is None:
        return None
    command = [*cppo(), "export", str(ckpt), str(tried[-1] / run_files.POLICY)]
    if children.run(command, log, env) != 0:
        return None
    return run_files.fitted_version(job.run_dir)


def run_job(
    job: Job,
    args: argparse.Namespace,
    configs: list[Path],
    pass_through: list[str],
    children: Children,
) -> dict[str, Any]:
    """Train and evaluate one run, or skip it when finished: its record. Once the study is
    stopping, nothing more of the run is started, and a command that ends non-zero was cut by
    the stop: the run is ``stopped`` (:func:`stopped`), not failed."""
    record = run_files.read_record(job.run_dir)
    if record is not None:
        say(f"{job.name}: finished before, skipped ({job.run_dir / run_files.RECORD})")
        return record
    if children.signal is not None:
        return stopped(job, None, None, None, children.signal)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = thread_env(args.jobs)
    start = time.perf_counter()
    log_dir = run_files.fitted_version(job.run_dir)
    if log_dir is None:
        ckpt = run_files.resume_checkpoint(job.run_dir)
        log = job.run_dir / run_files.FIT_LOG
        say(f"{job.name}: training" + (f", resumed from {ckpt}" if ckpt else "") + f" ({log})")
        status = children.run(fit_command(job, configs, pass_through, ckpt), log, env)
        if children.signal is not None and status != 0:
            return stopped(job, "cppo fit", status, log, children.signal)
        if status != 0:
            return failed(job, "cppo fit", f"exit status {status}", log)
        log_dir = run_files.fitted_version(job.run_dir)
        if log_dir is None and ckpt is not None:
            log_dir = export_resumed(job, log, env, children)
        if children.signal is not None and log_dir is None:
            return stopped(job, "cppo export", None, log, children.signal)
        if log_dir is None:
            return failed(
                job, "cppo fit", "no exported policy: is ExportPolicy among its callbacks?", log
            )
    log = job.run_dir / run_files.EVAL_LOG
    if children.signal is not None:
        return stopped(job, "cppo evaluate", None, log, children.signal)
    say(f"{job.name}: evaluating {log_dir / run_files.POLICY} ({log})")
    status = children.run(evaluate_command(log_dir, args), log, env)
    if children.signal is not None and status != 0:
        return stopped(job, "cppo evaluate", status, log, children.signal)
    if status != 0:
        return failed(job, "cppo evaluate", f"exit status {status}", log)
    try:
        record = run_files.build_record(
            job.method.label,
            job.seed,
            job.run_dir,
            log_dir,
            time.perf_counter() - start,
            run_files.code_version(),
        )
    except (OSError, KeyError, ValueError) as error:
        return failed(job, "reading the run's results", repr(error), log)
    run_files.write_atomic(job.run_dir / run_files.RECORD, json.dumps(json_safe(record)) + "\n")
    say(f"{job.name}: done in {record['wall_seconds']:.0f} s")
    return record


def check_args(args: argparse.Namespace, pass_through: list[str]) -> None:
    """Refuse settings that cannot work before anything runs (ConfigError)."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 or more.")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: give 1 or more.")
    if args.temperature < 0 or (args.temperature == 0 and args.samples > 1):
        raise ConfigError(
            f"--temperature {args.temperature} with --samples {args.samples}: give a temperature "
            "> 0, or 0 (greedy) with --samples 1."
        )
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size {args.eval_batch_size}: give 1 or more.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {args.seeds}: a seed is given twice.")
    for config in args.config:
        if not Path(config).expanduser().is_file():
            raise ConfigError(f"--config {config}: no such file.")
    own = [a for a in pass_through if a.split("=")[0] in OWN_FIT_FLAGS]
    if own:
        raise ConfigError(
            f"{' '.join(own)}: cppo study sets {', '.join(OWN_FIT_FLAGS)} for each run itself "
            "(--config before the methods' overlays); leave them out of the pass-through flags."
        )
    loose = [a for a in pass_through[:1] if not a.startswith("-")]
    if loose:
        raise ConfigError(
            f"{loose[0]!r}: not a flag of cppo study, and pass-through cppo fit flags start with "
            "--. See cppo study --help."
        )


def collect(output: Path, order: list[str], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's runs: every finished run under ``output/runs`` of the study's methods (its
    record rebuilt from its logs: :func:`~cppo_lightning.study.runs.refreshed`), and this
    command's runs that did not finish; by method (in ``order``), then seed."""
    records = {(r["method"], r["seed"]): r for r in fresh}
    for path in sorted((output / "runs").glob(f"*/{run_files.RECORD}")):
        record = run_files.read_record(path.parent)
        if record is not None and record["method"] in order:
            records[(record["method"], record["seed"])] = run_files.refreshed(record)
    return sorted(records.values(), key=lambda r: (order.index(r["method"]), r["seed"]))


def write_report(output: Path, settings: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``study.json``, ``study.md`` and, with matplotlib, the plots."""
    from cppo_lightning.study.plots import have_matplotlib, plot_study

    methods = [m for m in settings["overlays"] if any(r["method"] == m for r in records)]
    study = json_safe(
        {
            "settings": settings,
            "methods": methods,
            "seeds": sorted({r["seed"] for r in records}),
            "runs": records,
            "per_method": aggregate(records),
        }
    )
    run_files.write_atomic(output / "study.json", json.dumps(study, indent=2) + "\n")
    run_files.write_atomic(output / "study.md", to_markdown(study))
    say(f"wrote {output / 'study.json'} and {output / 'study.md'}")
    if not any(r.get("status") == "finished" for r in records):
        return
    if not have_matplotlib():
        say("plots skipped: matplotlib is not installed (pip install -e .[dev] to draw them)")
        return
    for path in plot_study(study, output):
        say(f"wrote {path}")


def archive_study(output: Path, archive: Path) -> None:
    """Copy the study's results to ``archive``: the settings (merged with the archive's own), the
    record of each finished run (rebuilt from its logs: :func:`collect`), then the archive's
    report of every run it holds, archived ones from earlier copies included. Every file is
    written atomically; nothing in ``archive`` is deleted."""
    settings = check_settings(archive, json.loads((output / SETTINGS_FILE).read_text()))
    order = list(settings["overlays"])
    finished = [r for r in collect(output, order, []) if r.get("status") == "finished"]
    for record in finished:
        run_dir = archive / "runs" / f"{record['method']}-seed{record['seed']}"
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(json_safe({k: v for k, v in record.items() if k != "archived"}))
        run_files.write_atomic(run_dir / run_files.RECORD, text + "\n")
    run_files.write_atomic(archive / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    say(f"archived {len(finished)} finished runs in {archive}")
    write_report(archive, settings, collect(archive, order, []))


def main(argv: list[str] | None = None) -> int:
    """Run ``cppo study``; the exit status (1 when a run failed; 143 or 130 when SIGTERM or
    SIGINT stopped it: :func:`stop_on_signals`).

    Raises:
        ConfigError: A setting refused before any run starts: an unknown method, a missing
            config, a study on disk with other settings, a flag the study sets itself.
    """
    parser = build_parser()
    args, pass_through = parser.parse_known_args(argv)
    check_args(args, pass_through)
    methods = resolve_methods(args.methods)
    configs = [Path(c).expanduser().resolve() for c in args.config]
    output = Path(args.output).expanduser().resolve()
    current = study_settings(
        configs,
        methods,
        pass_through,
        args.samples,
        args.temperature,
        args.eval_set,
        args.eval_batch_size,
    )
    if not args.report_only:
        check_settings(output, current)  # refused before the lock: nothing is written
    archive = None if args.archive is None else Path(args.archive).expanduser().resolve()
    if archive is not None:
        if archive == output:
            raise ConfigError(f"--archive {args.archive}: that is the study folder; give another.")
        if archive.exists() and not archive.is_dir():
            raise ConfigError(f"--archive {args.archive}: not a folder; give a folder's path.")
        check_settings(archive, current)  # an archive of another study is refused up front
    children = Children()
    with study_lock(output), stop_on_signals(children):
        status = _study(args, output, current, methods, configs, pass_through, children)
        if archive is not None:
            archive_study(output, archive)
        return status


def _study(
    args: argparse.Namespace,
    output: Path,
    current: dict[str, Any],
    methods: list[Method],
    configs: list[Path],
    pass_through: list[str],
    children: Children,
) -> int:
    """The study under its lock: train and evaluate the runs not finished yet, then report
    (when stopped, the runs finished so far)."""
    fresh: list[dict[str, Any]] = []
    if args.report_only:  # the study on disk, whatever this command's settings
        try:
            settings = json.loads((output / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"--report-only: no readable {SETTINGS_FILE} in {output}: run the study first."
            ) from None
    else:
        # Checked again under the lock: a study that ended since the first check may have added
        # its methods to the settings on disk, which the merged settings written here must keep.
        settings = check_settings(output, current)
        path = output / SETTINGS_FILE  # the folder exists: study_lock made it
        run_files.write_atomic(path, json.dumps(settings, indent=2) + "\n")
        jobs = [
            Job(m, seed, output / "runs" / f"{m.label}-seed{seed}")
            for seed in args.seeds
            for m in methods
        ]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(run_job, job, args, configs, pass_through, children) for job in jobs
            ]
            fresh = [future.result() for future in futures]
    records = collect(output, list(settings["overlays"]), fresh)
    write_report(output, settings, records)
    bad = [r for r in fresh if r.get("status") == "failed"]
    for record in bad:
        say(f"not finished: {record['method']} seed {record['seed']}: see {record['log']}")
    if children.signal is not None:
        say(
            f"cppo study: stopped by {children.signal.name}; the runs under way saved their "
            "state. Run the same command again to continue (finished runs are kept)."
        )
        return STOP_EXIT[children.signal]
    return 1 if bad else 0
