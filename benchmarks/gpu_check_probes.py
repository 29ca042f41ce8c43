"""What runs inside the parts of benchmarks/gpu_check.py, each in its own process: the callback
that times a ``cppo fit`` run's own calls (:class:`PhaseTimer`), the model build, and the
correctness checks."""

from __future__ import annotations

import functools
import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from benchmarks.gpu_check import BASE, Scale, data_flags

# Stated before any GPU measurement. fp32: the chunked head and the full logits differ only in
# summation order. bf16: both round logits to bf16, but kernels chosen per shape may round a
# logit differently (one bf16 ulp of a logit of 2-4 is 0.008-0.016). Views: the same parameter
# draws on both devices leave only interpolation rounding (images in [0, 1]; pixel_values are
# normalised, about [-2, 2]).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "views": 1e-3, "view_pixels": 1e-2}


class PhaseTimer(pl.Callback):
    """Times a fit run's own calls and appends one JSON line per call, as it finishes, to
    ``output``: ``generate`` (the rollout engine's ``sample``, with its response tokens),
    ``views`` (the DataModule's ``on_after_batch_transfer``, where the views are drawn), ``logp``
    (``prepare_update``: reference and old log-probs), ``update`` (``accumulate_gradients``: the
    policy, I+ and I- forwards and backwards of a mini-batch) and ``step`` (the whole training
    step), each with its CUDA peak memory (the peak statistics are reset as it starts) and the
    process's peak resident memory. A run cut short keeps the lines of the calls it finished.

    Args:
        output: The JSON-lines file.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.batch = 0

    def _write(self, record: dict[str, Any]) -> None:
        with self.output.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def _time(self, owner: Any, name: str, phase: str, count: Callable | None = None) -> None:
        """Replace ``owner.name`` (this run's object only) by a timed call of it."""
        call = getattr(owner, name)
        cuda = torch.cuda.is_available()

        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = call(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            record = {
                "event": "phase",
                "batch": self.batch,
                "phase": phase,
                "seconds": time.perf_counter() - start,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
            if count is not None:
                record["tokens"] = count(result)
            self._write(record)
            return result

        setattr(owner, name, timed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        cuda = pl_module.device.type == "cuda"
        params = list(pl_module.policy.parameters())
        self._write(
            {
                "event": "start",
                "device": torch.cuda.get_device_name(pl_module.device) if cuda else "cpu",
                "parameters": sum(p.numel() for p in params),
                "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            }
        )

        def tokens(samples: Any) -> int:
            return int(samples.response_mask.sum())

        self._time(pl_module.rollout_engine, "sample", "generate", tokens)
        self._time(trainer.datamodule, "on_after_batch_transfer", "views")  # type: ignore[attr-defined]
        self._time(pl_module.update, "prepare_update", "logp")
        self._time(pl_module.update, "accumulate_gradients", "update")
        self._time(pl_module.update, "training_step", "step")

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._write({"event": "batch_end", "batch": self.batch})
        self.batch += 1


# Qwen2.5-VL's published image processor budget (preprocessor_config.json of the 3B/7B
# checkpoints: min_pixels 3136, max_pixels 12845056); the embedded processor caps images at
# 112 x 112 (16 image tokens), which would keep every prompt tiny.
QWEN_PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}


def build(model_dir: Path, result: Path) -> None:
    """Save the random Qwen2.5-VL-3B (the config in benchmarks/model_step.py) with the embedded
    processor at Qwen2.5-VL's pixel budget; ``result`` gets its parameter count and the
    device."""
    from benchmarks.model_step import build, parameter_count

    build("3b", model_dir)
    use_qwen_pixels(model_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result.write_text(json.dumps({"parameters": parameter_count("3b")[0], "device": device}))


def use_qwen_pixels(model_dir: Path) -> None:
    """Give the processor saved in ``model_dir`` Qwen2.5-VL's pixel budget (:data:`QWEN_PIXELS`),
    so that 448 x 448 images make 256 image tokens, as they would with the real checkpoint."""
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["size"] = dict(QWEN_PIXELS)
    path.write_text(json.dumps(config, indent=2) + "\n")


def correctness(scale: Scale, model: str, result: Path) -> None:
    """The views drawn on the device vs on the CPU, and the chunked log-probs and entropies vs
    the full-logits path on the device (fp32, then bf16 autocast over fp32 weights, as
    ``bf16-mixed`` trains); ``result`` gets the checks and the device."""
    from cppo_lightning.cli import main as cppo
    from cppo_lightning.detection import token_entropy
    from cppo_lightning.logprobs import Scoring, chunk_positions, score_responses
    from cppo_lightning.policy import response_logits, suppressed_token_ids, token_logps

    gpu = torch.cuda.is_available() and scale.accelerator == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    # The datamodule and model of the fit parts (same data flags), built by the real CLI.
    flags = [f"--model.model_name_or_path={model}", "--model.dtype=float32", *data_flags(scale)]
    cli = cppo(["--config", BASE, *flags, "--trainer.accelerator=cpu"], run=False)
    datamodule, module = cli.datamodule, cli.model
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    on_device = datamodule.transfer_batch_to_device(batch, device, 0)
    checks = []

    def check(name: str, a: list[torch.Tensor], b: list[torch.Tensor], tolerance: float) -> None:
        difference = max(
            float((x.cpu().float() - y.cpu().float()).abs().max())
            for x, y in zip(a, b, strict=True)
        )
        checks.append(
            {
                "name": name,
                "value": difference,
                "tolerance": tolerance,
                "passed": difference <= tolerance,
            }
        )

    # The views of the same rows and seeds, drawn on the device and on the CPU.
    host, drawn = datamodule.view_maker(batch, 0).views, datamodule.view_maker(on_device, 0).views
    for name, pixels in (("preserving", "vision_pos"), ("removing", "vision_neg")):
        where = f"{name} views of {len(getattr(host, name))} images on {device.type} vs cpu"
        check(
            f"{where}: images, max |diff|",
            getattr(host, name),
            getattr(drawn, name),
            TOLERANCE["views"],
        )
        a, b = getattr(host, pixels)["pixel_values"], getattr(drawn, pixels)["pixel_values"]
        check(f"{where}: pixel_values, max |diff|", [a], [b], TOLERANCE["view_pixels"])

    # Chunked log-probs and entropies vs the full [n, L, V] logits, on the device: 2 prompts x
    # 2 random responses (the full path holds [4, L, V] float32 logits, 2.5 GB at 1,024).
    module.configure_model()
    policy = module.policy.to(device).eval()
    suppressed = tuple(suppressed_token_ids(module.processor))
    vocab = policy.get_output_embeddings().weight.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[list(suppressed)] = False
    allowed = allowed.nonzero().flatten()
    index = torch.arange(min(2, on_device.num_prompts), device=device).repeat_interleave(2)
    shape = (len(index), scale.correctness_tokens)
    draw = torch.randint(len(allowed), shape, generator=torch.Generator().manual_seed(0))
    ids = allowed[draw].to(device)  # [n, L]
    mask = torch.ones_like(ids)
    chunks = math.ceil(ids.numel() / chunk_positions(vocab, scale.chunk_tokens))
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = score_responses(
                policy, on_device, index, ids, mask, Scoring(1.0, suppressed, scale.chunk_tokens)
            )
            logp, entropy = scores.logps_and_entropy()  # [n, L] each
            logits = response_logits(policy, on_device, index, ids, mask).float()  # [n, L, V]
            logits = logits.index_fill(-1, torch.tensor(suppressed, device=device), -math.inf)
            full_logp, full_entropy = token_logps(logits, ids), token_entropy(logits)
        del logits
        where = (
            f"{device.type}, {'bf16 autocast' if bf16 else 'fp32'}, "
            f"{shape[0]} x {shape[1]} tokens, {chunks} chunks"
        )
        tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
        check(
            f"chunked log-probs vs full logits ({where}), max |diff|",
            [logp],
            [full_logp],
            tolerance,
        )
        check(
            f"chunked entropies vs full logits ({where}), max |diff|",
            [entropy],
            [full_entropy],
            tolerance,
        )
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    result.write_text(json.dumps({"device": name, "checks": checks}))
