"""A CPPO step of a Qwen2.5-VL-3B-sized (or 7B-sized) model built from its config, random weights.

    python benchmarks/model_step.py --size 3b --steps 4            # one GPU, ~80 GB
    python benchmarks/model_step.py --size 3b --lora --steps 4     # the 1-GPU LoRA recipe's setting
    python benchmarks/model_step.py --size tiny --accelerator cpu  # check the script on a CPU
    python benchmarks/model_step.py --size 3b --estimate           # memory by estimate, no GPU

Builds the model from the published architecture sizes (no download: random weights, the embedded
model's small tokenizer; the 151,936-token vocabulary is kept, since it dominates the logits'
memory), saves it, and runs `cppo fit` on it for a few steps in a child process: CPPO as
configs/base.yaml with float32 master weights under bf16 autocast (or LoRA on a bf16 base),
activation checkpointing, images upscaled to 448 x 448 (256 image tokens). A random policy never
emits end-of-sequence, so every response has exactly --response-tokens tokens; the reward is a
hash of the text, so groups have variance and CPPO's I+/I- forwards run on the ~half of the
responses with A > 0, as in real training. Prints median rollout and update seconds per step
(first step dropped) and the CUDA peak memory. Figures go into docs/paper-recipe.md; nothing here
is asserted by tests.

``--estimate`` runs nothing: it counts the parameters of the model built on the meta device and
prints the memory of one CPPO update micro-batch, term by term, for the log-prob path before
(full ``[n, L, V]`` logits, commit ebce29e) and now (chunked LM head). The two per-view factors
are measured, not guessed: ``benchmarks/logprob_memory.py micro`` found the full-logits path
holding 2.7 float32 copies of ``[n, L, V]`` per view above the activations (at L = 512 and
1,024 alike) and the chunked path a constant 1.1-1.4 GiB at the default chunk of 2**26 logits.
Activations assume checkpointing per decoder layer with float32 layer inputs (the residual
stream of float32 master weights under bf16 autocast; bf16 on a LoRA bf16 base) and leave out
the one layer being recomputed, the vision tower and the allocator's slack: an estimate, not a
CUDA peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.step_time import _scalars  # noqa: E402

# Published Qwen2.5-VL sizes (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct).
SIZES: dict[str, dict[str, Any]] = {
    "3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
        "tie_word_embeddings": True,
    },
    "7b": {
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
        "tie_word_embeddings": False,
    },
    "tiny": {
        "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1},
        "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "fullatt_block_indexes": [1]},
        "tie_word_embeddings": True,
    },
}  # fmt: skip
VOCAB = 151936
# From benchmarks/logprob_memory.py micro (docs/results.md#memory-of-the-log-prob-path).
FULL_LOGITS_COPIES_PER_VIEW = 2.7
CHUNKED_HEAD_GIB = 1.4


def text_hash_reward(completions: list[str], **_: Any) -> list[float]:
    """A deterministic reward with variance inside every group (for timing only)."""
    return [zlib.crc32(text.encode()) % 1000 / 1000 for text in completions]


def _config(size: str, tokenizer: Any) -> Any:
    """The Qwen2.5-VL config of ``size`` with ``tokenizer``'s special ids."""
    from transformers import Qwen2_5_VLConfig

    spec = SIZES[size]
    text = spec["text"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    quarter = head_dim // 8
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": VOCAB,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [head_dim // 2 - 2 * (3 * quarter // 2), *[3 * quarter // 2] * 2],
            },
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **spec["vision"],
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "window_size": 112,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=spec["tie_word_embeddings"],
    )
    return config


def build(size: str, directory: Path) -> None:
    """Save a random Qwen2.5-VL of ``size`` with the embedded model's tokenizer and processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cppo_lightning.policy import load_processor

    processor = load_processor("builtin:tiny-qwen2.5-vl")
    tokenizer = processor.tokenizer
    config = _config(size, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    print(f"built {size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def child(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> None:
    from cppo_lightning.cli import main as cppo

    lora = ["--model.lora={r: 64, alpha: 128}", "--model.dtype=bfloat16"] if args.lora else []
    cppo(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "base.yaml"),
            f"--model.model_name_or_path={model_dir}",
            "--model.dtype=float32",
            *lora,
            "--model.activation_checkpointing=true",
            "--model.attn_implementation=sdpa",
            f"--model.micro_batch_size={args.micro_batch_size}",
            "--model.reward.init_args.functions={hash: benchmarks.model_step.text_hash_reward}",
            "--model.reward.init_args.weights={hash: 1.0}",
            "--model.val_accuracy_term=null",
            f"--rollout.group_size={args.group_size}",
            f"--rollout.max_new_tokens={args.response_tokens}",
            f"--data.batch_size={args.prompts}",
            "--data.min_pixels=200704",  # 448 x 448: 256 image tokens per prompt
            f"--trainer.accelerator={args.accelerator}",
            f"--trainer.precision={'bf16-mixed' if args.accelerator != 'cpu' else '32-true'}",
            f"--trainer.max_steps={args.steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={log_dir}",
        ]
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({"peak_gib": peak}))


def parameter_count(size: str) -> tuple[int, int, int]:
    """(all parameters, text layers, text hidden size) of the model, built on the meta device."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cppo_lightning.policy import load_processor

    config = _config(size, load_processor("builtin:tiny-qwen2.5-vl").tokenizer)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = SIZES[size]["text"]
    return (
        sum(p.numel() for p in model.parameters()),
        text["num_hidden_layers"],
        text["hidden_size"],
    )


def estimate(args: argparse.Namespace) -> None:
    """Memory of one CPPO update micro-batch, term by term, before and after the chunked path."""
    gib = 2**30
    params, layers, hidden = parameter_count(args.size)
    n, length = args.micro_batch_size, args.response_tokens
    positions = args.prompt_tokens + length
    # CPPO holds the original forward of all n and the I+ and I- forwards of the responses with
    # A > 0 (about half) for one backward: 2 views' worth of n.
    views = 1 + 2 * 0.5
    if args.lora:
        state = {"frozen base, bf16 (the reference is the base with adapters off)": 2 * params}
    else:
        state = {
            "weights, fp32 master": 4 * params,
            "gradients, fp32": 4 * params,
            "AdamW moments, fp32": 8 * params,
            "frozen reference, fp32": 4 * params,
        }
    # float32 residual stream under autocast over fp32 master weights; bf16 on a bf16 LoRA base
    activations = views * layers * n * positions * hidden * (2 if args.lora else 4)
    full = FULL_LOGITS_COPIES_PER_VIEW * views * n * length * VOCAB * 4
    rows = [(name, value / gib) for name, value in state.items()]
    rows.append((f"checkpointed layer inputs ({views:g} views x {n} x {positions} positions)",
                 activations / gib))  # fmt: skip
    fixed = sum(value for _, value in rows)
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(f"Qwen2.5-VL-{args.size}: {params / 1e9:.2f}B parameters; micro-batch {n} x "
          f"{length} response tokens, prompt {args.prompt_tokens}; "
          f"{mode}; estimate, one GPU, no sharding")  # fmt: skip
    print("| term | GiB |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    copies = FULL_LOGITS_COPIES_PER_VIEW
    print(
        f"| log-prob path before: {copies} fp32 copies of [n, L, V] per view | {full / gib:.1f} |"
    )
    print(f"| log-prob path now: one LM-head chunk of 2**26 logits | {CHUNKED_HEAD_GIB:.1f} |")
    print(f"| **total before** | **{fixed + full / gib:.1f}** |")
    print(f"| **total now** | **{fixed + CHUNKED_HEAD_GIB:.1f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="B per rollout batch")
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument(
        "--child", nargs=2, metavar=("MODEL_DIR", "LOG_DIR"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--estimate", action="store_true", help="print the memory estimate; run nothing"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=360, help="for --estimate: 256 image + text tokens"
    )
    args = parser.parse_args()
    if args.estimate:
        estimate(args)
        return
    if args.child:
        child(args, Path(args.child[0]), Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, log_dir = Path(tmp) / "model", Path(tmp) / "logs"
        build(args.size, model_dir)
        done = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", str(model_dir), str(log_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"the fit failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        run = str(next(log_dir.rglob("events.out.*")).parent)
        rollout = _scalars(run, "rollout/seconds")[1:] or _scalars(run, "rollout/seconds")
        update = _scalars(run, "train/update_seconds")[1:] or _scalars(run, "train/update_seconds")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print("| model | mode | device | B x G x L | rollout s | update s | step s | peak GiB |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    peak = f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "n/a"
    r, u = statistics.median(rollout), statistics.median(update)
    autocast = " + bf16 autocast" if args.accelerator != "cpu" else ""
    mode = ("LoRA r64, bf16 base" if args.lora else "full, fp32 master") + autocast
    shape = f"{args.prompts} x {args.group_size} x {args.response_tokens}"
    print(f"| Qwen2.5-VL-{args.size} | {mode} | {device} | {shape} | {r:.2f} | {u:.2f} | "
          f"{r + u:.2f} | {peak} |")  # fmt: skip


if __name__ == "__main__":
    main()
