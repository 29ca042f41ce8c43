"""What one `cppo fit` run measured: held-out curve and gaps, detection, contrastive term.

    python benchmarks/run_summary.py runs/base        # the README's default run

Reads the run's newest TensorBoard log and prints `val/accuracy` and the Evaluation callback's
greedy accuracy under each image condition at every evaluated step; PerceptionMonitor's detection
precision against the base rate and the two baselines, as means over the logged steps of the first
and last third of the run and of the whole run; the medians of D+, D- and
`perception/contrast_accuracy`, and the CPL's mean over the first and last tenth; and the median
rollout and update seconds. The tables in docs/results.md come from it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from compare_methods import CONDITIONS, DETECTION, cpl_figures, read_all_scalars, window


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("run", type=Path, help="the run's trainer.default_root_dir")
    args = parser.parse_args()
    s = read_all_scalars(args.run)

    def points(tag: str) -> str:
        return ", ".join(f"{t}: {v:.4f}" for t, v in s.get(tag, []))

    print("val/accuracy", points("val/accuracy"))
    for condition in CONDITIONS:
        print(f"greedy {condition}", points(f"eval/synthetic/{condition}/accuracy"))
    if "perception/precision" in s:
        for name, first, last in (("early", 0, 1 / 3), ("late", 2 / 3, 1), ("run", 0, 1)):
            means = [
                statistics.mean(window(s[f"perception/{key}"], first, last)) for key, _ in DETECTION
            ]
            pairs = zip(DETECTION, means, strict=True)
            cells = " | ".join(f"{label} {m:.3f}" for (_, label), m in pairs)
            print(f"detection {name}: {cells} | lift {means[0] / means[1]:.2f}x")
    if "perception/cpl" in s:
        f = cpl_figures(s)
        print(
            f"median D+ {f['d_pos']:.4f}, D- {f['d_neg']:.4f}, "
            f"contrast_accuracy {f['contrast_accuracy']:.3f}, "
            f"cpl {f['cpl']:.3f}; cpl mean first tenth "
            f"{f['cpl_first_tenth']:.3f}, last tenth {f['cpl_last_tenth']:.3f}"
        )
    for tag in ("rollout/accuracy", "rollout/zero_variance_groups", "train/kl"):
        if tag in s:
            first, last = (statistics.mean(window(s[tag], a, b)) for a, b in ((0, 0.1), (0.9, 1)))
            print(f"{tag}: first tenth {first:.3f}, last tenth {last:.3f}")
    rollout = statistics.median(v for _, v in s["rollout/seconds"])
    update = statistics.median(v for _, v in s["train/update_seconds"])
    print(f"step: rollout {rollout:.3f} s, update {update:.3f} s (medians)")


if __name__ == "__main__":
    main()
