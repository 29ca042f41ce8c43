r"""``cppo evaluate``: avg@k ± std on benchmarks, under image conditions, for any model.

    cppo evaluate builtin:tiny-qwen2.5-vl --eval configs/eval/synthetic.yaml --samples 4 \
        --images original blank shuffled removing --output runs/eval/tiny

MODEL is a hub name, a local Hugging Face directory (``<log_dir>/hf_policy``, ``cppo export``
output), ``builtin:NAME``, or a ``.ckpt`` written by ``cppo fit`` (its module settings are read from
the checkpoint, LoRA is merged, and the views come from the ``config.yaml`` saved beside it).
Defaults are the CPPO paper's protocol: k = 16 samples at temperature 1.0, top-p 1.0, 2048 new
tokens, the last ``\boxed{}`` graded by math-verify. Responses are sampled by a rollout engine
(``--engine``: Hugging Face ``generate`` by default, as in ``cppo fit``'s ``rollout.engine``).
``OUTPUT/responses.jsonl`` gets every response as it is produced; running the same command again
continues where it stopped. On SIGTERM the command stops once the unit in progress is written and
exits with status 143, printing the command that continues it. Results go to
``OUTPUT/results.{json,csv,md}`` and ``OUTPUT/tensorboard``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from cppo_lightning.evaluation.conditions import CONDITIONS, ImageConditions, check_conditions
from cppo_lightning.evaluation.sets import EvalSet, load_eval_set
from cppo_lightning.rollout import HFGenerate, RolloutEngine, Sampling

PROTOCOL_MAX_NEW_TOKENS = 2048
RUN_FILE = "run.json"
DEFAULT_ENGINE = f"{HFGenerate.__module__}.{HFGenerate.__qualname__}"
# Settings that change the responses: a directory holds the responses of one combination.
_RESPONSE_SETTINGS = (
    "model",
    "samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "batch_size",
    "dtype",
    "engine",
)
# What a run.json written before a setting was recorded had: its responses came from these.
_UNRECORDED = {"engine": {"class_path": DEFAULT_ENGINE, "init_args": {}}}


class _DefaultsShown(argparse.HelpFormatter):
    """``--help`` names each option's default, unless its text already says it or there is none
    to name (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cppo evaluate",
        description=__doc__.split("\n\n")[0].strip() if __doc__ else None,
        epilog="Paper protocol: --samples 16 --temperature 1.0 --top-p 1.0 --max-new-tokens 2048.",
        formatter_class=_DefaultsShown,
    )
    parser.add_argument(
        "model",
        help="hub name, local Hugging Face directory, builtin:NAME, or a `cppo fit` .ckpt",
    )
    parser.add_argument(
        "--eval",
        nargs="+",
        required=True,
        metavar="SET",
        help="configs/eval/*.yaml files, or inline dataset specs such as '{path: test.jsonl}'",
    )
    parser.add_argument(
        "--samples", type=int, default=16, metavar="K", help="responses per prompt (k)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="sampling temperature; 0 = greedy",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"response budget (default: the set's, else {PROTOCOL_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and of the shuffle")
    parser.add_argument(
        "--images",
        nargs="+",
        default=["original"],
        metavar="COND",
        help=f"image conditions: {', '.join(CONDITIONS)} (default: original)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="results directory")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per generate call (x K responses)"
    )
    parser.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        metavar="CLASS_PATH",
        help="what samples the responses: import path of a cppo_lightning.rollout.RolloutEngine "
        "subclass, as fit's rollout.engine takes it (a bare name is looked up in "
        "cppo_lightning.rollout; default: %(default)s, Hugging Face generate)",
    )
    parser.add_argument(
        "--engine-args",
        default=None,
        metavar="MAPPING",
        help="the engine's init args, a YAML or JSON mapping such as '{tag: eval}' (default: none)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a fit config whose data.preserving_view / removing_view / view_seed make the "
        "preserving and removing images (default: the .ckpt's config.yaml, else the paper's "
        "views, docs/method.md §4)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="weight dtype (default: a .ckpt's training dtype, else float32)",
    )
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: cpu, gpu, ..."
    )
    parser.add_argument("--devices", default="1", help="devices per node (an int, a list, or auto)")
    parser.add_argument("--num-nodes", type=int, default=1, help="machines")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    parser.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="do not show the progress bar"
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise SystemExit(f"cppo evaluate: --samples must be >= 1, got {args.samples}.")
    if args.temperature < 0:
        raise SystemExit(f"cppo evaluate: --temperature must be >= 0, got {args.temperature}.")
    if args.temperature == 0 and args.samples > 1:
        raise SystemExit(
            "cppo evaluate: --temperature 0 decodes greedily, so all samples would be the same: "
            "use --samples 1."
        )
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"cppo evaluate: --top-p must be in (0, 1], got {args.top_p}.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit(
            f"cppo evaluate: --max-new-tokens must be >= 1, got {args.max_new_tokens}."
        )
    if args.batch_size < 1:
        raise SystemExit(f"cppo evaluate: --batch-size must be >= 1, got {args.batch_size}.")
    try:
        args.images = check_conditions(args.images)
    except ValueError as error:
        raise SystemExit(f"cppo evaluate: {error}") from None


def build_engine(class_path: str, init_args: str | None) -> tuple[RolloutEngine, dict[str, Any]]:
    """The ``--engine`` with its ``--engine-args``, and how ``run.json`` records it
    (``{"class_path": ..., "init_args": {...}}``); SystemExit naming what is wrong."""
    import yaml

    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "cppo_lightning.rollout")
        engine_class = getattr(module, name)
    except (ImportError, AttributeError) as error:
        raise SystemExit(
            f"cppo evaluate: --engine {class_path!r} cannot be imported ({error}): give the "
            f"import path of a RolloutEngine subclass, e.g. {DEFAULT_ENGINE}."
        ) from None
    if not (isinstance(engine_class, type) and issubclass(engine_class, RolloutEngine)):
        raise SystemExit(
            f"cppo evaluate: --engine {class_path!r} is not a subclass of "
            "cppo_lightning.rollout.RolloutEngine."
        )
    try:
        kwargs = yaml.safe_load(init_args) if init_args else {}
    except yaml.YAMLError as error:
        raise SystemExit(f"cppo evaluate: --engine-args does not parse: {error}") from None
    if not isinstance(kwargs, dict):
        raise SystemExit(
            f"cppo evaluate: --engine-args must be a mapping such as '{{tag: eval}}', got "
            f"{init_args!r}."
        )
    try:
        engine = engine_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise SystemExit(
            f"cppo evaluate: {engine_class.__name__}(**{kwargs!r}) failed: {error}; check "
            "--engine-args."
        ) from None
    path = f"{engine_class.__module__}.{engine_class.__qualname__}"
    return engine, {"class_path": path, "init_args": kwargs}


def check_model(model: str) -> None:
    """Fail early for a local model path that does not exist (a hub name is left to the hub)."""
    from cppo_lightning.policy import BUILTIN_PREFIX, resolve_model_path

    if model.startswith(BUILTIN_PREFIX):
        resolve_model_path(model)  # lists the built-in models if the name is wrong
        return
    path = Path(model).expanduser()
    looks_local = (
        model.startswith((".", "/", "~"))
        or model.endswith(".ckpt")
        or model.count("/") != 1
        or path.exists()
    )
    if looks_local and not path.exists():
        raise SystemExit(
            f"cppo evaluate: no model at {model!r}: give an existing directory with a "
            "config.json, a .ckpt written by `cppo fit`, builtin:NAME, or a hub name (org/name)."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise SystemExit(
            f"cppo evaluate: {model!r} has no config.json: point at a Hugging Face model "
            "directory (e.g. <log_dir>/hf_policy) or a .ckpt."
        )


def check_output(output: Path) -> None:
    """Create ``output`` and make sure files can be written there."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SystemExit(
            f"cppo evaluate: cannot write to --output {str(output)!r} ({error.strerror}): "
            "choose a directory you can write to."
        ) from None


def check_run_file(output: Path, settings: dict[str, Any], sets: list[EvalSet]) -> dict:
    """The run description to save; SystemExit if ``output`` holds responses of other settings
    (they would be mixed up with these)."""
    fingerprints = {s.name: s.fingerprint() for s in sets}
    path = output / RUN_FILE
    previous: dict[str, Any] = {}
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [
            f"{key}: {previous.get(key, _UNRECORDED.get(key))!r} -> {settings[key]!r}"
            for key in _RESPONSE_SETTINGS
            if previous.get(key, _UNRECORDED.get(key)) != settings[key]
        ]
        changed += [
            f"eval set {name!r} settings"
            for name, value in fingerprints.items()
            if previous.get("sets", {}).get(name) not in (None, value)
        ]
        if changed:
            raise SystemExit(
                f"cppo evaluate: {str(output)!r} holds an evaluation with other settings "
                f"({'; '.join(changed)}); its responses would be mixed with these. Use another "
                "--output (or the same settings to continue that evaluation)."
            )
    elif (output / "responses.jsonl").exists():
        raise SystemExit(
            f"cppo evaluate: {str(output)!r} has a responses.jsonl but no {RUN_FILE}: it was not "
            "written by this command with known settings; use another --output."
        )
    return {**previous, **settings, "sets": {**previous.get("sets", {}), **fingerprints}}


def _read_fit_config(path: Path) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"cppo evaluate: {path} is not a fit config (a YAML mapping).")
    return config


def view_conditions(config: dict[str, Any] | None, source: str) -> ImageConditions:
    """The preserving/removing views and their seed, from a fit config's ``data`` section (the
    paper's perturbation families (docs/method.md §4) when there is no config)."""
    from cppo_lightning.perturbations import information_preserving, information_removing

    if config is None:
        return ImageConditions(information_preserving(), information_removing(), 0)
    data = config.get("data") or {}
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--preserving_view", type=torch.nn.Module | None, default=None)
    parser.add_argument("--removing_view", type=torch.nn.Module | None, default=None)
    try:
        parsed = parser.parse_object(
            {
                "preserving_view": data.get("preserving_view"),
                "removing_view": data.get("removing_view"),
            }
        )
        views = parser.instantiate_classes(parsed)
    except Exception as error:
        raise SystemExit(f"cppo evaluate: cannot build the views of {source}: {error}") from None
    return ImageConditions(
        views.preserving_view, views.removing_view, int(data.get("view_seed", 0))
    )


def _fit_config_beside(checkpoint: Path) -> Path | None:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


class ModelLoader:
    """Loads the policy and processor of MODEL (picklable, so DataLoader workers and launched
    ranks can hold it)."""

    def __init__(self, model: str, dtype: str | None) -> None:
        self.model = model
        self.dtype = dtype
        self._settings: dict[str, Any] | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.model.endswith(".ckpt")

    def settings(self) -> dict[str, Any]:
        """A ``.ckpt``'s module settings and ``global_step`` (read once)."""
        if self._settings is None:
            from cppo_lightning.export import checkpoint_settings

            self._settings = checkpoint_settings(self.model)
        return self._settings

    def processor(self) -> Any:
        from cppo_lightning.policy import load_processor

        if self.is_checkpoint:
            return load_processor(self.settings()["model_name_or_path"])
        return load_processor(self.model)

    def __call__(self) -> tuple[torch.nn.Module, Any]:
        if self.is_checkpoint:
            from cppo_lightning.export import load_fit_checkpoint

            module = load_fit_checkpoint(self.model, self.dtype)
            assert module.policy is not None
            policy = module.policy
            if module.lora is not None:
                policy = policy.merge_and_unload()  # type: ignore[operator]
            return policy, module.processor
        from cppo_lightning.policy import load_policy, load_processor

        return load_policy(self.model, self.dtype or "float32"), load_processor(self.model)

    def global_step(self) -> int:
        return int(self.settings().get("global_step", 0)) if self.is_checkpoint else 0


def _devices(value: str) -> Any:
    if value == "auto":
        return value
    if value.startswith("["):
        return json.loads(value)
    return int(value)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run ``cppo evaluate``; returns the results payload on global rank 0 (None elsewhere)."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    args.command = shlex.join(["cppo", "evaluate", *given])  # the command that continues this run
    _check_args(args)
    check_model(args.model)
    engine, engine_record = build_engine(args.engine, args.engine_args)
    output = Path(args.output).expanduser()
    check_output(output)
    try:
        sets = [load_eval_set(value) for value in args.eval]
    except ValueError as error:
        raise SystemExit(f"cppo evaluate: {error}") from None
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise SystemExit(f"cppo evaluate: two eval sets have the same name ({names}): rename one.")

    loader = ModelLoader(args.model, args.dtype)
    config_path = Path(args.config) if args.config else None
    if config_path is None and loader.is_checkpoint:
        config_path = _fit_config_beside(Path(args.model))
        if config_path is None and set(args.images) & {"preserving", "removing"}:
            warnings.warn(
                f"no config.yaml beside {args.model}: the preserving/removing images use the "
                "paper's perturbations with view_seed 0, which may not be the run's; pass "
                "--config with the run's config to use its views.",
                stacklevel=1,
            )
    if config_path is not None and not config_path.is_file():
        raise SystemExit(f"cppo evaluate: --config {str(config_path)!r} does not exist.")
    conditions = view_conditions(
        _read_fit_config(config_path) if config_path else None, str(config_path)
    )
    try:
        conditions.check(args.images)
    except ValueError as error:
        raise SystemExit(f"cppo evaluate: {error}") from None

    settings = {
        "model": args.model,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "engine": engine_record,
    }
    run = check_run_file(output, settings, sets)
    return evaluate(args, sets, loader, conditions, output, run, engine)


def evaluate(
    args: argparse.Namespace,
    sets: list[EvalSet],
    loader: ModelLoader,
    conditions: ImageConditions,
    output: Path,
    run: dict[str, Any],
    engine: RolloutEngine | None = None,
) -> dict[str, Any] | None:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cppo_lightning.callbacks.stops import PREEMPTED_EXIT_CODE
    from cppo_lightning.evaluation.loop import (
        EvalDataModule,
        EvalModule,
        EvalProgressBar,
        ResponseWriter,
    )
    from cppo_lightning.evaluation.report import (
        RESPONSES,
        log_tensorboard,
        read_records,
        summarize,
        to_markdown,
        write_atomic,
        write_results,
    )

    processor = loader.processor()
    datamodule = EvalDataModule(
        sets,
        processor,
        args.images,
        conditions,
        args.samples,
        args.batch_size,
        args.seed,
        output,
        num_workers=args.num_workers,
    )
    # Load and check every set before the model and before any generation.
    try:
        datamodule.prepare_sets()
    except ValueError as error:
        raise SystemExit(f"cppo evaluate: {error}") from None
    try:
        read_records(output / RESPONSES)  # a damaged line is refused before the model loads
    except ValueError as error:
        raise SystemExit(f"cppo evaluate: {error}") from None
    # One sampling per set: its own response budget unless --max-new-tokens is given.
    budgets = {
        s.name: args.max_new_tokens or s.max_new_tokens or PROTOCOL_MAX_NEW_TOKENS for s in sets
    }
    if len(set(budgets.values())) > 1:
        raise SystemExit(
            f"cppo evaluate: the sets have different response budgets {budgets}: evaluate them "
            "in separate commands or pass --max-new-tokens."
        )
    max_new_tokens = next(iter(budgets.values()))
    sampling = Sampling(max_new_tokens, args.temperature, top_p=args.top_p)
    module = EvalModule(loader, {s.name: s for s in sets}, sampling, args.samples, engine)
    callbacks: list[pl.Callback] = [ResponseWriter(output)]
    if not args.no_progress_bar:
        callbacks.append(EvalProgressBar())
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=_devices(args.devices),
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=not args.no_progress_bar,
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the unit plan shards (engine.shard)
        default_root_dir=str(output),
    )
    if trainer.is_global_zero:
        write_atomic(output / RUN_FILE, json.dumps(run, indent=2) + "\n")
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(
                "cppo evaluate: SIGTERM: stopped after the unit in progress; "
                f"{output / RESPONSES} keeps every whole unit scored so far; exit status "
                f"{PREEMPTED_EXIT_CODE}. Continue with: {args.command}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    trainer.strategy.barrier("evaluate-done")
    if not trainer.is_global_zero:
        return None
    records = read_records(output / RESPONSES)
    prepared = [datamodule.prepared[s.name] for s in sets]
    results = summarize(prepared, args.images, args.samples, records)
    payload = {
        "model": args.model,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": max_new_tokens,
        "seed": args.seed,
        "engine": run["engine"],
        "results": results,
    }
    write_results(output, payload)
    log_tensorboard(output, results, loader.global_step())
    print(to_markdown(results), end="")
    print(f"results: {output / 'results.json'}", file=sys.stderr)
    return payload
