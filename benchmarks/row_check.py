"""Cost of the set-up pass that checks every row (decode, resize, tokenize with image tokens).

    python benchmarks/row_check.py [--rows 50] [--width 1024 --height 768]

Times ``PromptCollator.prompt_length`` on synthetic PNG rows with the paper recipe's settings
(the paper instruction, max_pixels 262144) and Qwen2.5-VL's image processor, in one process: the
per-row figure times the dataset size, divided by ``data.preprocess_workers``, estimates the pass.
The figure goes into docs/paper-recipe.md; nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cppo_lightning.data import PAPER_INSTRUCTION
from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.policy import load_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--max-pixels", type=int, default=262144)
    args = parser.parse_args()
    processor = load_processor("builtin:tiny-qwen2.5-vl")
    processor.image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2)  # Qwen's
    collator = PromptCollator(
        processor, PAPER_INSTRUCTION, min_pixels=3136, max_pixels=args.max_pixels
    )
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(args.rows):
        pixels = rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        image = {"bytes": buffer.getvalue(), "path": None}
        rows.append({"question": "<image>Find the area of the shaded region.", "image": image})
    start = time.perf_counter()
    lengths = [collator.prompt_length(row, collator.images(row)) for row in rows]
    per_row = (time.perf_counter() - start) / len(rows)
    print(
        f"{per_row * 1000:.1f} ms per row ({args.width}x{args.height} PNG, max_pixels "
        f"{args.max_pixels}): {lengths[0]} prompt tokens; 38,870 rows (ViRL39K) = "
        f"{38870 * per_row / 60:.0f} min in one process"
    )


if __name__ == "__main__":
    main()
