"""Memory of the log-prob path at Qwen2.5-VL's vocabulary (151,936): full logits vs chunked head.

    python benchmarks/logprob_memory.py micro                 # one CPPO micro-batch, L = 512..2048
    python benchmarks/logprob_memory.py cli --tokens 128 640  # `cppo fit`, GRPO, peak RSS
    PYTHONPATH=/path/to/old/checkout/src python benchmarks/logprob_memory.py cli  # the old code

Both build the embedded model's architecture (text 128 x 4 layers, vision 64 x 2) from its
config with the vocabulary set to 151,936 and fresh random weights, with the embedded tokenizer
(so prompts are real synthetic-task prompts).

``micro`` runs, in a fresh child process per (path, L), one CPPO micro-batch of n = 4 responses
of L random tokens, float32 on CPU: the policy forward under the original image, the I- and I+
forwards, the entropies of detection (original and I-), the clipped surrogate + lambda * CPL (k3,
tau 0.1, a fixed 25% of tokens selected) and the backward. Three paths:

- ``old``: what the trainer did before the chunked path (ebce29e): ``model(...).logits`` over the
  last L + 1 positions, ``token_logps`` upcasting the ``[n, L, V]`` logits to float32, and
  ``token_entropy`` on full logits;
- ``new``: :mod:`cppo_lightning.logprobs` (backbone hidden states, LM head in chunks of
  ``--chunk`` positions, recomputed in the backward);
- ``activations``: the same three backbone forwards and the backward with no LM head at all
  (loss = a weighted sum of the hidden states): the floor any log-prob path sits on.

Peak memory is the process's high-water RSS (``/proc/self/status`` VmHWM after resetting it with
``/proc/self/clear_refs``) during the step, minus the RSS before it (model and inputs loaded).
It also prints, at ``--check-length``, the largest differences between old and new log-probs and
gradients (float32). Figures go into docs/results.md; nothing here is asserted by tests.

``cli`` runs ``cppo fit --config configs/base.yaml --config configs/experiments/grpo.yaml`` for 2
steps, group size 4, 2 prompts per step, ``micro_batch_size`` 8, no validation or callbacks, at
each ``--tokens`` value of ``rollout.max_new_tokens`` (a random model rarely emits EOS, so
responses run to it), and prints the child's peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936


def build(directory: Path) -> None:
    """The embedded model's config with a 151,936-token vocabulary, random weights, saved."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from cppo_lightning.policy import load_processor, resolve_model_path

    source = resolve_model_path("builtin:tiny-qwen2.5-vl")
    config = AutoConfig.from_pretrained(source)
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(directory)
    load_processor("builtin:tiny-qwen2.5-vl").save_pretrained(directory)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _inputs(model_dir: Path, length: int, dtype: torch.dtype) -> dict[str, Any]:
    from cppo_lightning.data.datamodule import PromptCollator
    from cppo_lightning.data.synthetic import build_dataset
    from cppo_lightning.policy import load_policy, load_processor, suppressed_token_ids

    processor = load_processor(str(model_dir))
    model = load_policy(str(model_dir)).to(dtype)
    dataset = build_dataset(2, seed=0)
    prompts = PromptCollator(processor, "Answer.")([dataset[i] for i in range(2)])
    generator = torch.Generator().manual_seed(length)
    suppressed = torch.tensor(suppressed_token_ids(processor))
    ids = torch.randint(VOCAB, (4, length), generator=generator)
    ids = torch.where(torch.isin(ids, suppressed), torch.zeros_like(ids), ids)
    pixels = prompts.vision["pixel_values"]
    return {
        "model": model,
        "prompts": prompts,
        "index": torch.tensor([0, 0, 1, 1]),
        "ids": ids,
        "mask": torch.ones_like(ids),
        "advantages": torch.tensor([1.0, 0.5, 1.0, 0.5]),
        "selected": torch.rand(ids.shape, generator=generator) < 0.25,
        "suppressed": tuple(suppressed_token_ids(processor)),
        "views": {
            "preserving": {**prompts.vision, "pixel_values": pixels * 0.9},
            "removing": {**prompts.vision, "pixel_values": torch.zeros_like(pixels)},
        },
    }


def cppo_step(
    path: str, data: dict[str, Any], chunk: int | None, suppress: bool = True
) -> torch.Tensor:
    """One micro-batch loss of CPPO on ``path``; returns ``logp`` (the backward has run).
    ``suppress``: the new path gives the sampler's suppressed tokens probability 0 (the old
    path did not; the value check turns it off to compare the two paths' arithmetic)."""
    from cppo_lightning.detection import token_entropy
    from cppo_lightning.logprobs import Scoring, response_hidden, score_responses
    from cppo_lightning.losses import contrastive_perception_loss, policy_loss
    from cppo_lightning.policy import token_logps

    model, prompts, index, ids, mask = (
        data[k] for k in ("model", "prompts", "index", "ids", "mask")
    )
    views = data["views"]
    if path == "activations":
        weights = torch.linspace(0, 1, model.config.text_config.hidden_size)
        total = sum(
            (response_hidden(model, prompts, index, ids, mask, vision) * weights).mean()
            for vision in (None, views["removing"], views["preserving"])
        )
        total.backward()  # type: ignore[union-attr]
        return torch.zeros_like(ids, dtype=torch.float32)
    if path == "old":

        def logits_of(vision: dict[str, torch.Tensor] | None) -> torch.Tensor:
            inputs = {
                "input_ids": torch.cat([prompts.input_ids[index], ids], 1),
                "attention_mask": torch.cat([prompts.attention_mask[index], mask], 1),
                **prompts.select_vision(index, vision),
                "mm_token_type_ids": torch.cat(
                    [prompts.mm_token_type_ids[index], torch.zeros_like(ids)], 1
                ),
                "logits_to_keep": ids.shape[1] + 1,
                "use_cache": False,
            }
            return model(**inputs).logits[:, :-1]  # [n, L, V]

        logits = logits_of(None)
        logp = token_logps(logits, ids)
        logits_neg = logits_of(views["removing"])
        with torch.no_grad():
            token_entropy(logits.detach())
            token_entropy(logits_neg.detach())
        logp_pos = token_logps(logits_of(views["preserving"]), ids)
        logp_neg = token_logps(logits_neg, ids)
    else:
        scoring = Scoring(1.0, data["suppressed"] if suppress else (), chunk)
        scores = score_responses(model, prompts, index, ids, mask, scoring)
        logp = scores.logps()
        logp_neg, _ = score_responses(
            model, prompts, index, ids, mask, scoring, views["removing"]
        ).logps_and_entropy()
        scores.entropy()
        logp_pos = score_responses(
            model, prompts, index, ids, mask, scoring, views["preserving"]
        ).logps()
    loss, _ = policy_loss(logp, logp.detach(), data["advantages"], mask)
    cpl, _ = contrastive_perception_loss(
        logp, logp_pos, logp_neg, data["selected"].to(logp.dtype), tau=0.1
    )
    (loss + 0.01 * cpl).backward()
    return logp.detach()


def micro_child(model_dir: Path, path: str, length: int, chunk: int | None) -> None:
    torch.set_num_threads(2)
    data = _inputs(model_dir, length, torch.float32)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    cppo_step(path, data, chunk)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print("RESULT " + json.dumps({"peak_gib": (peak - before) / 2**20, "seconds": seconds}))


def check_child(model_dir: Path, length: int, chunk: int | None) -> None:
    """Largest |old - new| of the log-probs and of every gradient, float32, at ``chunk``
    positions per head chunk (7 when unset, so that the check exercises the recompute)."""
    chunk = chunk or 7
    data = _inputs(model_dir, length, torch.float32)
    model = data["model"]
    results = {}
    for path in ("old", "new"):
        model.zero_grad(set_to_none=True)
        logp = cppo_step(path, data, chunk, suppress=False)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = (logp, grads)
    (old_logp, old_grads), (new_logp, new_grads) = results["old"], results["new"]
    grad_diff = max((old_grads[n] - new_grads[n]).abs().max().item() for n in old_grads)
    scale = max(g.abs().max().item() for g in old_grads.values())
    print(
        "RESULT "
        + json.dumps(
            {
                "logp_diff": (old_logp - new_logp).abs().max().item(),
                "grad_diff": grad_diff,
                "grad_scale": scale,
                "same_params": sorted(old_grads) == sorted(new_grads),
            }
        )
    )


def _run(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


def micro(args: argparse.Namespace, model_dir: Path) -> None:
    chunk = ["--chunk", str(args.chunk)] if args.chunk else []
    check = _run(["child-check", str(model_dir), str(args.check_length), *chunk])
    print(f"values at L = {args.check_length}, float32, old vs new: {json.dumps(check)}")
    print("| L | path | peak GiB over the loaded model | seconds |")
    print("|---:|---|---:|---:|")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for length in args.lengths:
        for path in ("activations", "new", "old"):
            if path == "old" and length > args.old_max:
                print(f"| {length} | old | not run (--old-max {args.old_max}) | |")
                continue
            result = _run(["child-micro", str(model_dir), path, str(length), *chunk])
            rows[(path, length)] = result
            if "error" in result:
                print(f"| {length} | {path} | failed: {result['error']} | |")
            else:
                print(f"| {length} | {path} | {result['peak_gib']:.2f} | {result['seconds']:.1f} |")
            sys.stdout.flush()
    for length in args.lengths:
        old, new = rows.get(("old", length)), rows.get(("new", length))
        if old and new and "error" not in old and "error" not in new:
            print(f"L = {length}: old / new peak = {old['peak_gib'] / new['peak_gib']:.1f}x")


def cli_child(model_dir: Path, tokens: int, root: Path) -> None:
    from cppo_lightning.cli import main as cppo

    cppo(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "base.yaml"),
            "--config",
            str(REPO / "configs" / "experiments" / "grpo.yaml"),
            f"--model.model_name_or_path={model_dir}",
            "--model.micro_batch_size=8",
            "--rollout.group_size=4",
            f"--rollout.max_new_tokens={tokens}",
            "--data.batch_size=2",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={root}",
        ]
    )


def cli(args: argparse.Namespace, model_dir: Path, tmp: Path) -> None:
    import cppo_lightning

    print(f"cppo_lightning from {Path(cppo_lightning.__file__).parent}")
    print("| max_new_tokens | peak RSS GiB | seconds |")
    print("|---:|---:|---:|")
    peaks = []
    for tokens in args.tokens:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "child-cli", str(model_dir), str(tokens), str(tmp / "run")],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"cppo fit failed at {tokens} tokens:\n{done.stderr[-3000:]}")
        # ru_maxrss of the children waited for so far: the largest, i.e. this run's when the
        # runs are ordered by length.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        peaks.append(peak)
        print(f"| {tokens} | {peak:.2f} | {seconds:.0f} |")
        sys.stdout.flush()
    if len(peaks) > 1:
        print(
            f"difference {args.tokens[-1]} - {args.tokens[0]} tokens: "
            f"{peaks[-1] - peaks[0]:.2f} GiB"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("child-"):
        kind, model_dir = sys.argv[1], Path(sys.argv[2])
        rest = sys.argv[3:]
        chunk = int(rest[rest.index("--chunk") + 1]) if "--chunk" in rest else None
        if kind == "child-micro":
            micro_child(model_dir, rest[0], int(rest[1]), chunk)
        elif kind == "child-check":
            check_child(model_dir, int(rest[0]), chunk)
        else:
            cli_child(model_dir, int(rest[0]), Path(rest[1]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("micro", help="one CPPO micro-batch, old vs new path")
    m.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    m.add_argument("--old-max", type=int, default=1024, help="longest L the old path runs at")
    m.add_argument("--chunk", type=int, default=None, help="logprob_chunk_tokens (default budget)")
    m.add_argument("--check-length", type=int, default=64)
    c = sub.add_parser("cli", help="`cppo fit` peak RSS at two response lengths")
    c.add_argument("--tokens", type=int, nargs="+", default=[128, 640])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build(model_dir)
        if args.mode == "micro":
            micro(args, model_dir)
        else:
            cli(args, model_dir, Path(tmp))


if __name__ == "__main__":
    main()
