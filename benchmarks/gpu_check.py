"""First contact with a GPU in one command: a Qwen2.5-VL-3B-sized CPPO run, part by part.

    python benchmarks/gpu_check.py                              # one CUDA GPU (80 GB), ~8 minutes
    python benchmarks/gpu_check.py --tiny                       # the same on CPU, embedded model
    python benchmarks/gpu_check.py --compare old.json [new.json]

No network and no downloaded weights: `build` saves a random-weight model of Qwen2.5-VL-3B's
architecture (the config written in benchmarks/model_step.py: the public config's sizes and the
real 151,936-token vocabulary) with the embedded model's processor at Qwen2.5-VL's pixel budget
(448 x 448 images: 256 image tokens). Its tokenizer knows a few hundred of the 151,936 ids: the
random policy samples from all of them (the LM head and the log-prob path are full size) and
decoding drops the unknown ones, which is fine for speed and memory. Then each part runs in its
own subprocess under its own time budget (`--budget PART=S`, all of them together under
`--total-budget`), so one slow part cannot eat the others; a timeout, an out-of-memory or an
error is a row of the table, not a crash:

    lora-1024, lora-4096  `cppo fit` (the real CLI: configs/base.yaml + the 1-GPU LoRA recipe)
                          in bf16-mixed, CPPO, 8 prompts x 8 responses forced to 1,024 / 4,096
                          new tokens (rollout.engine HFGenerate with min_new_tokens)
    full, fsdp            the same from the 8-GPU recipe (full fine-tuning, float32 master
                          weights) on one device: without a strategy, and under its FSDPStrategy
    correctness           chunked log-probs and entropies vs the full-logits path on the device
                          (fp32 and bf16 autocast), the views drawn on the device vs on the CPU

Per phase, from the run itself (`PhaseTimer`, a callback added with --trainer.callbacks, times
the run's own calls and writes each as it finishes, so a part cut by its budget still reports
the phases it got through) and from the metrics it logs to TensorBoard: generation tokens/s, the
views, the reference/old log-probs (`prepare_update`), the update (policy + I+ + I- forwards and
backwards, optimizer steps), peak CUDA memory of each, `rollout/logp_mismatch`. The first rollout
batch of a part is dropped from the timings when it ran more than one (warm-up). The table is
printed and a JSON written (`--output`) that `--compare` diffs against a later run's.

`--tiny` runs the same parts and code on the CPU with the embedded model (fp32, a few tokens):
tests/e2e/test_gpu_check.py runs it, so the script does not rot. FSDP needs CUDA (Lightning and
torch refuse it on a CPU): under --tiny its row says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_check_report import compare, fit_figures, mismatch_checks, table, write  # noqa: E402

BASE = str(REPO / "configs" / "base.yaml")
LORA_RECIPE = str(REPO / "configs" / "paper" / "qwen2.5-vl-3b-1gpu-lora.yaml")
FULL_RECIPE = str(REPO / "configs" / "paper" / "qwen2.5-vl-3b-8gpu.yaml")
SCHEMA = 1
ORDER = ("build", "lora-1024", "correctness", "lora-4096", "full", "fsdp")
FIT_PARTS = ("lora-1024", "lora-4096", "full", "fsdp")
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")


@dataclasses.dataclass(frozen=True)
class Scale:
    """What a run of the check looks like on a GPU, or under --tiny on the CPU."""

    accelerator: str
    precision: str
    lora_dtype: str  # the frozen base of the LoRA parts
    prompts: int
    group_size: int
    mini_batch_prompts: int
    micro_batch_size: int
    new_tokens: dict[str, int]
    rollout_batches: dict[str, int]
    budgets: dict[str, float]
    total_budget: float
    min_start: float  # a part cut by the total budget to less than this is skipped
    image_flags: tuple[str, ...]  # the image size of every part's data
    chunk_tokens: int | None  # LM-head positions per chunk in the correctness check
    correctness_tokens: int
    threads: int | None = None  # OMP_NUM_THREADS of the children (unless set)


GPU = Scale(
    accelerator="gpu",
    precision="bf16-mixed",
    lora_dtype="bfloat16",
    prompts=8,
    group_size=8,
    mini_batch_prompts=4,  # two optimizer steps per rollout batch: old log-probs are computed
    micro_batch_size=4,  # the recipes' micro-batch
    new_tokens={"lora-1024": 1024, "lora-4096": 4096, "full": 1024, "fsdp": 1024},
    rollout_batches={"lora-1024": 2, "lora-4096": 1, "full": 1, "fsdp": 1},
    # Guesses, not measurements (no GPU has run this yet): most of lora-4096 is generating
    # 4,096 tokens x 64 responses. Parts run in ORDER; the last ones get what is left of the
    # total budget.
    budgets={
        "build": 90,
        "lora-1024": 120,
        "correctness": 60,
        "lora-4096": 180,
        "full": 75,
        "fsdp": 75,
    },
    total_budget=480,
    min_start=30,
    image_flags=("--data.min_pixels=200704",),  # 448 x 448 images: 256 image tokens a prompt
    chunk_tokens=None,  # the run's default: 2**26 logits, 441 positions of 151,936
    correctness_tokens=1024,
)
TINY = Scale(
    accelerator="cpu",
    precision="32-true",
    lora_dtype="float32",
    prompts=2,
    group_size=4,
    mini_batch_prompts=1,
    micro_batch_size=4,
    new_tokens={"lora-1024": 8, "lora-4096": 16, "full": 8, "fsdp": 8},
    rollout_batches={"lora-1024": 2, "lora-4096": 1, "full": 1, "fsdp": 1},
    budgets={part: 180 for part in ORDER},
    total_budget=900,
    min_start=5,
    image_flags=(),  # 112 x 112: 16 image tokens
    chunk_tokens=7,  # several chunks even at the embedded model's small vocabulary
    correctness_tokens=16,
    # One thread: a tiny model gains nothing from more, and on a busy CPU two threads that wait
    # for each other made a part 2.3x slower.
    threads=1,
)


# ------------------------------------------------------------------ the fit parts' commands
def data_flags(scale: Scale) -> list[str]:
    """The data of every part: the synthetic task of configs/base.yaml, a few rows of it."""
    return [
        f"--data.batch_size={scale.prompts}",
        f"--data.dataset.init_args.num_train={4 * scale.prompts}",
        "--data.dataset.init_args.num_val=2",
        *scale.image_flags,
    ]


def fit_command(part: str, scale: Scale, model: str, root: Path, phases: Path) -> list[str]:
    """The ``cppo fit`` command line of a fit part (the real CLI, the shipped recipes)."""
    tokens = scale.new_tokens[part]
    steps = scale.rollout_batches[part] * (scale.prompts // scale.mini_batch_prompts)
    if part.startswith("lora"):
        recipe = [LORA_RECIPE, f"--model.dtype={scale.lora_dtype}"]
    else:  # the 8-GPU recipe on one device; "full" without its FSDP strategy
        recipe = [FULL_RECIPE, "--trainer.devices=1"]
        if part == "full":
            recipe.append("--trainer.strategy=auto")
    return [
        sys.executable,
        "-m",
        "cppo_lightning.cli",
        "fit",
        "--config",
        BASE,
        "--config",
        *recipe,
        f"--model.model_name_or_path={model}",
        *data_flags(scale),
        "--model.reward.init_args.functions={hash: benchmarks.model_step.text_hash_reward}",
        "--model.reward.init_args.weights={hash: 1.0}",
        "--model.val_accuracy_term=null",
        f"--model.mini_batch_size={scale.mini_batch_prompts}",
        f"--model.micro_batch_size={scale.micro_batch_size}",
        f"--rollout.group_size={scale.group_size}",
        f"--rollout.max_new_tokens={tokens}",
        f"--rollout.generation_batch_size={scale.prompts * scale.group_size}",
        "--rollout.engine=cppo_lightning.rollout.HFGenerate",
        f"--rollout.engine.min_new_tokens={tokens}",  # every response exactly `tokens` long
        f"--trainer.accelerator={scale.accelerator}",
        f"--trainer.precision={scale.precision}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks=[]",  # no checkpoints, export or evaluation: phases only
        "--trainer.callbacks+=benchmarks.gpu_check_probes.PhaseTimer",
        f"--trainer.callbacks.output={phases}",
    ]


# ------------------------------------------------------------------ running a part
def classify(returncode: int, output: str) -> tuple[str, str]:
    """(status, message) of a finished child: ok, oom (CUDA out of memory) or error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if returncode == 0:
        return "ok", ""
    if any(marker in output for marker in OOM_MARKERS):
        line = next((x for x in reversed(lines) if any(m in x for m in OOM_MARKERS)), "")
        return "oom", line[:300]
    errors = [x for x in lines if "Error" in x or x.startswith("error")]
    return "error", ((errors or lines or [f"exit status {returncode}"])[-1])[:300]


def run_part(
    command: list[str], budget: float, log: Path, threads: int | None = None
) -> tuple[str, str, float]:
    """Run ``command`` offline with its output in ``log``, killed (its whole process group)
    after ``budget`` seconds. Returns (status, message, seconds)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    start = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        child = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the fit and any worker it started
            child.wait()
            return (
                "timeout",
                f"stopped after its budget of {budget:.0f} s",
                time.monotonic() - start,
            )
    status, message = classify(returncode, log.read_text(errors="replace"))
    return status, message, time.monotonic() - start


def _git_commit() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(dirty)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    commit, dirty = _git_commit()
    return {
        "device": None,  # filled in by the first part that ran on it
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "transformers", "lightning", "peft")},
        "git_commit": commit,
        "git_dirty": dirty,
    }


def check_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected part in ORDER, writing the report after each; return it."""
    scale = TINY if args.tiny else GPU
    budgets = {**scale.budgets, **dict(args.budget)}
    output = Path(args.output)
    logs = output.with_name(output.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    # The model (7.5 GB at 3B) and the runs: kept in --workdir, else removed at the end.
    temporary = None if args.workdir else tempfile.TemporaryDirectory(prefix="gpu_check-")
    work = Path(args.workdir or temporary.name)  # type: ignore[union-attr]
    model = "builtin:tiny-qwen2.5-vl" if args.tiny else str(args.model_dir or work / "model")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "tiny": args.tiny,
        "model": model,
        "environment": environment(),
        "parts": {},
        "checks": [],
    }
    for part in ORDER:
        report["parts"][part] = {
            "status": "not-selected",
            "message": "",
            "seconds": None,
            "settings": part_settings(part, scale, budgets[part]),
            "figures": None,
            "log": None,
        }
    deadline = time.monotonic() + (args.total_budget or scale.total_budget)
    lock = threading.Lock()  # the report is written after each part, parts may run in threads

    def attempt(part: str) -> None:
        if part not in args.parts:
            return
        with lock:
            skip = skip_reason(part, args, report)
        left = deadline - time.monotonic()
        if skip:
            update: dict[str, Any] = {"status": "skipped", "message": skip}
        elif left < min(budgets[part], scale.min_start):
            update = {"status": "skipped", "message": "the total budget (--total-budget) was spent"}
        else:
            log = logs / f"{part}.log"
            update = run_one(part, scale, model, work, min(budgets[part], left), log)
        with lock:
            device = update.pop("device", None)
            report["environment"]["device"] = report["environment"]["device"] or device
            report["parts"][part].update(update)
            write(report, output)

    attempt(ORDER[0])  # the model the others need
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(attempt, ORDER[1:]))  # in ORDER with one job
    if args.tiny:
        report["environment"]["device"] = report["environment"]["device"] or "cpu"
    report["checks"] = [*report["parts"]["correctness"].get("checks", []), *mismatch_checks(report)]
    write(report, output)
    if temporary is not None:
        temporary.cleanup()
    return report


def part_settings(part: str, scale: Scale, budget: float) -> dict[str, Any]:
    settings: dict[str, Any] = {"budget_s": budget}
    if part in FIT_PARTS:
        settings.update(
            mode={"lora-1024": "lora", "lora-4096": "lora"}.get(part, part),
            precision=scale.precision,
            prompts=scale.prompts,
            group_size=scale.group_size,
            new_tokens=scale.new_tokens[part],
            rollout_batches=scale.rollout_batches[part],
        )
    return settings


def skip_reason(part: str, args: argparse.Namespace, report: dict[str, Any]) -> str:
    """Why ``part`` is not run (empty: it is run)."""
    if part == "build":
        if args.tiny:
            return "--tiny uses the embedded model"
        if args.model_dir:
            return f"--model-dir {args.model_dir} is used"
        return ""
    if part == "fsdp" and args.tiny:
        return "FSDP needs a CUDA device (Lightning refuses the strategy on a CPU)"
    build = report["parts"]["build"]
    if not args.tiny and not args.model_dir and build["status"] != "ok":
        return f"no model: build {build['status']}"
    return ""


def run_one(
    part: str, scale: Scale, model: str, work: Path, budget: float, log: Path
) -> dict[str, Any]:
    """Run ``part`` under ``budget`` seconds; returns what goes into its row (and ``device``,
    the name of the device it ran on when it says)."""
    result = work / f"{part}.json"
    here = [sys.executable, __file__, "--model-dir", model, "--result", str(result)]
    if part == "build":
        command = [*here, "--child", "build"]
    elif part == "correctness":
        command = [*here, "--child", "correctness", *(["--tiny"] if scale is TINY else [])]
    else:
        root, result = work / "runs" / part, work / f"{part}.phases.jsonl"
        command = fit_command(part, scale, model, root, result)
    result.unlink(missing_ok=True)
    status, message, seconds = run_part(command, budget, log, scale.threads)
    settings = {**part_settings(part, scale, 0), "budget_s": round(budget, 1)}
    row: dict[str, Any] = {
        "status": status,
        "message": message,
        "seconds": round(seconds, 1),
        "settings": settings,
        "log": str(log),
    }
    if part in FIT_PARTS:
        row["figures"] = fit_figures(result, work / "runs" / part)
        row["device"] = row["figures"].pop("device")
        if status == "ok" and not row["figures"]["rollout_batches_timed"]:
            row.update(status="error", message="the run finished without a timed rollout batch")
    elif result.exists():
        found = json.loads(result.read_text())
        row.update(found)
        if part == "correctness" and not all(c["passed"] for c in found["checks"]):
            row.update(status="failed", message="a check is outside its tolerance")
    return row


# ------------------------------------------------------------------ command line
def _budget(text: str) -> tuple[str, float]:
    part, _, seconds = text.partition("=")
    if part not in ORDER or not seconds:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART one of {ORDER}")
    return part, float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU, embedded model, seconds")
    parser.add_argument("--output", help="the JSON report (default runs/gpu_check[-tiny].json)")
    parser.add_argument("--parts", nargs="+", choices=ORDER, default=list(ORDER))
    parser.add_argument(
        "--budget",
        action="append",
        type=_budget,
        default=[],
        metavar="PART=SECONDS",
        help="a part's time budget",
    )
    parser.add_argument("--total-budget", type=float, help="seconds for all parts together")
    parser.add_argument(
        "--workdir", help="keeps the model and the runs (default: a temporary folder, removed)"
    )
    parser.add_argument("--model-dir", help="a model saved by an earlier run: skips `build`")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parts run at once after build (keep 1 on one GPU: peaks and "
        "timings are per part); --tiny on a CPU can use one per core",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="OLD [NEW]: the differences of this run (or NEW) from OLD",
    )
    parser.add_argument("--child", choices=("build", "correctness"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # inside a part's process
        from benchmarks import gpu_check_probes as probes

        if args.child == "build":
            probes.build(Path(args.model_dir), Path(args.result))
        else:
            probes.correctness(TINY if args.tiny else GPU, args.model_dir, Path(args.result))
        return 0
    if args.compare and len(args.compare) == 2:
        old, new = (json.loads(Path(p).read_text()) for p in args.compare)
        print(compare(old, new))
        return 0
    if not args.tiny:
        import torch  # is_available() creates no CUDA context: the parts get the whole device

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: --tiny runs the same parts on the CPU")
    args.output = args.output or str(
        REPO / "runs" / f"gpu_check{'-tiny' if args.tiny else ''}.json"
    )
    # Read before the run: OLD may be the file this run writes.
    old = json.loads(Path(args.compare[0]).read_text()) if args.compare else None
    report = check_all(args)
    print(table(report))
    print(f"\nreport: {args.output}")
    if old is not None:
        print("\n" + compare(old, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
