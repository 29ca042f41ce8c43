"""One table from several `cppo evaluate` output directories (rows: model x image condition).

    python benchmarks/eval_table.py runs/eval/warm-start-greedy runs/eval/cppo-greedy ...

Each directory's results.json gives accuracy ± std over the sample sets, the 95% interval over
prompts, the visual-reliance gap (accuracy under original minus this condition's) and the share of
prompts whose majority answer is the one they have under original images. The directory names
label the rows. Tables go into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path)
    args = parser.parse_args()
    print("| model | benchmark | images | k | accuracy ± std | 95% CI | gap | answers kept |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for directory in args.directories:
        payload = json.loads((directory / "results.json").read_text())
        for r in payload["results"]:
            low, high = r["ci95"]
            gap = "-" if r.get("gap") is None else f"{100 * r['gap']:+.1f}"
            print(
                f"| {directory.name} | {r['benchmark']} | {r['images']} | {r['k']} | "
                f"{_pct(r['accuracy'])} ± {_pct(r['std'])} | {_pct(low)}-{_pct(high)} | {gap} | "
                f"{_pct(r['answer_kept'])} |"
            )


if __name__ == "__main__":
    main()
