"""How much a policy's answers depend on the image: accuracy with the real images vs black ones.

    python benchmarks/image_dependence.py [MODEL ...]   # default: builtin:tiny-qwen2.5-vl

For each model (hub name, local path, `builtin:NAME`, or an exported `<log_dir>/hf_policy`),
prints greedy held-out accuracy on the synthetic task's 256 validation prompts with their images
and with every image replaced by a black one of the same size, and the mean full-vocabulary
KL(pi(.|image) || pi(.|black)) per response token of the greedy responses. A policy that does
not look at the image scores the same on both and has a KL near 0; then perception-token
detection has nothing to find. Figures go into docs/results.md.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.data.synthetic import INSTRUCTION, SyntheticShapes
from cppo_lightning.policy import load_policy, load_processor, response_logits, suppressed_token_ids
from cppo_lightning.rollout import Sampling, generate_responses
from cppo_lightning.tiny import heldout_accuracy


@torch.no_grad()
def image_kl(model: torch.nn.Module, processor, rows: list[dict], black: list[dict]) -> float:  # type: ignore[no-untyped-def]
    collate = PromptCollator(processor, INSTRUCTION)
    real, dark = collate(rows), collate(black)
    ids, mask = generate_responses(
        model,
        processor,
        real,
        Sampling(64, 0.0),
        num_samples=1,
        suppress_token_ids=suppressed_token_ids(processor),
    )
    index = torch.arange(len(rows))
    logp = torch.log_softmax(response_logits(model, real, index, ids, mask).float(), -1)
    logq = torch.log_softmax(
        response_logits(model, real, index, ids, mask, vision=dark.vision).float(), -1
    )
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [N, L]
    return float(kl[mask.bool()].mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("models", nargs="*", default=["builtin:tiny-qwen2.5-vl"])
    args = parser.parse_args()
    validation = SyntheticShapes().load()["validation"]
    blacked = validation.map(lambda row: {"image": Image.new("RGB", row["image"].size)})
    print("| model | greedy accuracy, real images | black images | KL(real || black) per token |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        model, processor = load_policy(name).eval(), load_processor(name)
        real = heldout_accuracy(model, processor, validation)
        dark = heldout_accuracy(model, processor, blacked)
        rows = [validation[i] for i in range(64)]
        kl = image_kl(model, processor, rows, [blacked[i] for i in range(64)])
        print(f"| {name} | {real:.3f} | {dark:.3f} | {kl:.2e} |")


if __name__ == "__main__":
    main()
