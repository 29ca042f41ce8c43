"""Rebuild the embedded default model ``builtin:tiny-qwen2.5-vl`` deterministically from a seed.

    python scripts/build_tiny_model.py [--seed 0] [--vision-steps 300] [--sft-steps 140]

Trains the tokenizer on the synthetic task's text and builds a tiny Qwen2.5-VL; pretrains its
vision tower on dense per-region targets of the training images, of occluded copies of them and
of copies under the information-preserving views;
warm-starts the whole model with
a supervised phase on the training split (the region loss kept on as an auxiliary term); then
measures it with ``cppo evaluate`` on the held-out split under the original, blank and shuffled
images, greedy and avg@4 at temperature 1. The model is written into
``src/cppo_lightning/assets/tiny-qwen2.5-vl`` with ``build_info.json`` (how it was built and what
it measured) only if it looks: greedy accuracy with the original images at least
``--min-gap`` above blank and shuffled images, and inside ``--accuracy-range``. Otherwise the
script exits with an error and the asset already there is left as it was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cppo_lightning.data.rows import image_tensor, tensor_image
from cppo_lightning.data.synthetic import SyntheticShapes, generate_samples, region_targets
from cppo_lightning.evaluation.command import main as evaluate
from cppo_lightning.perturbations import (
    RandomOcclusion,
    apply_seeded,
    information_preserving,
    view_seed,
)
from cppo_lightning.tiny import (
    build_random_tiny,
    looking_problems,
    pretrain_vision,
    supervised_warm_start,
)

OUTPUT = (
    Path(__file__).resolve().parents[1] / "src" / "cppo_lightning" / "assets" / "tiny-qwen2.5-vl"
)
ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "configs" / "eval" / "synthetic.yaml"
CONDITIONS = ("original", "blank", "shuffled")


def perturb(
    perturbation: torch.nn.Module, image: Image.Image, seed: int, index: int
) -> Image.Image:
    """``image`` under ``perturbation``, seeded per image, rounded to 8 bits."""
    return tensor_image(
        apply_seeded(perturbation, image_tensor(image), view_seed(seed, index, 0, "build"))
    )


def measure(model_dir: Path, workdir: Path, samples: int, temperature: float) -> dict[str, Any]:
    """``cppo evaluate`` on the held-out split: condition -> accuracy, gap and per-kind accuracy."""
    output = workdir / f"eval-k{samples}-t{temperature}"
    payload = evaluate(
        [
            str(model_dir),
            "--eval",
            str(EVAL_SET),
            "--samples",
            str(samples),
            "--temperature",
            str(temperature),
            "--images",
            *CONDITIONS,
            "--batch-size",
            "64",
            "--output",
            str(output),
            "--no-progress-bar",
        ]
    )
    assert payload is not None
    return {
        r["images"]: {
            "accuracy": round(r["accuracy"], 4),
            "gap": None if r["gap"] is None else round(r["gap"], 4),
            "by_category": {k: round(v, 4) for k, v in sorted(r["by_category"].items())},
        }
        for r in payload["results"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=300, help="vision pretraining steps")
    parser.add_argument("--vision-lr", type=float, default=3e-3)
    parser.add_argument("--sft-steps", type=int, default=140, help="supervised warm-start steps")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--region-weight", type=float, default=0.5, help="auxiliary loss weight")
    parser.add_argument("--min-gap", type=float, default=0.25, help="original minus blank/shuffled")
    parser.add_argument("--accuracy-range", type=float, nargs=2, default=(0.30, 0.70))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    low, high = args.accuracy_range
    if not 0.0 <= low <= high <= 1.0 or args.min_gap < 0:
        parser.error(
            f"--accuracy-range needs 0 <= LOW <= HIGH <= 1 and --min-gap >= 0, got "
            f"{low} {high} and {args.min_gap}"
        )

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    # The same data the default config trains and validates on (SyntheticShapes defaults, as in
    # configs/base.yaml and configs/eval/synthetic.yaml), so the measured accuracy is the default
    # run's starting point. The scenes come from the same seed as the training split's rows.
    source = SyntheticShapes(seed=0)
    data = source.load()
    train_scenes = generate_samples(source.num_train, source.train_seed)
    if [s["question"] for s in train_scenes] != data["train"]["question"]:
        raise SystemExit("the training scenes do not match the training split's rows")
    images = [s["image"] for s in train_scenes]
    targets = np.stack([region_targets(s["shapes"], s["image"]) for s in train_scenes])
    # The vision pretraining also sees an occluded copy of every image, with the targets of what
    # still shows: a pretrained VLM reads noise rectangles as something covering the scene, and
    # the tiny tower is shown the default information-removing occlusion as that, before RL
    # uses it, rather than as shapes it has never seen.
    occlusion = RandomOcclusion(keepdim=True)
    occluded = [perturb(occlusion, image, args.seed, i) for i, image in enumerate(images)]
    occluded_targets = np.stack(
        [region_targets(s["shapes"], o) for s, o in zip(train_scenes, occluded, strict=True)]
    )
    # And a copy under the default information-preserving views (colour jitter, perspective,
    # rotation), with the targets of the original scene: a pretrained VLM still sees a red
    # circle in a darker or tilted image, and the tiny tower, which would otherwise learn the
    # palette's exact values only, is taught the same.
    preserving = information_preserving()
    preserved = [perturb(preserving, image, args.seed, i) for i, image in enumerate(images)]

    model, processor = build_random_tiny(seed=args.seed)
    head, vision_losses = pretrain_vision(
        model,
        processor,
        images + occluded + preserved,
        np.concatenate([targets, occluded_targets, targets]),
        steps=args.vision_steps,
        lr=args.vision_lr,
        seed=args.seed,
    )
    losses = supervised_warm_start(
        model,
        processor,
        data["train"],
        steps=args.sft_steps,
        lr=args.sft_lr,
        seed=args.seed,
        region_head=head,
        targets=targets,
        region_weight=args.region_weight,
    )
    train_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "model"
        model.save_pretrained(built)
        processor.save_pretrained(built)
        greedy = measure(built, Path(tmp), samples=1, temperature=0.0)
        torch.manual_seed(args.seed)
        sampled = measure(built, Path(tmp), samples=4, temperature=1.0)
        card = {
            "seed": args.seed,
            "data": {"source": "cppo_lightning.data.SyntheticShapes", "seed": source.seed},
            "vision_pretraining": {
                "steps": args.vision_steps,
                "lr": args.vision_lr,
                "batch_size": 32,
                "trains": "vision tower and merger, through a throw-away linear region head",
                "images": "the training images, an occluded copy of each (RandomOcclusion, "
                "targets of what still shows) and a copy under the information-preserving views "
                "(targets of the original)",
                "final_loss": round(vision_losses[-1], 4),
            },
            "supervised": {
                "steps": args.sft_steps,
                "lr": args.sft_lr,
                "schedule": "linear decay to 0, gradient norm clipped at 1.0",
                "batch_size": 32,
                "region_loss_weight": args.region_weight,
                "final_loss": round(losses[-1], 4),
            },
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(train_seconds, 1),
            "heldout": {
                "eval_set": "configs/eval/synthetic.yaml",
                "greedy": greedy,
                "avg@4_temperature_1": sampled,
            },
        }
        print(json.dumps(card, indent=2))
        problems = looking_problems(greedy, args.min_gap, tuple(args.accuracy_range))
        if problems:
            sys.exit(
                "the built model does not look at its image well enough; the asset at "
                f"{args.output} is unchanged:\n  " + "\n  ".join(problems)
            )
        (built / "build_info.json").write_text(json.dumps(card, indent=2) + "\n")
        staged = args.output.with_name(args.output.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(built, staged)
        if args.output.exists():
            shutil.rmtree(args.output)
        staged.rename(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
