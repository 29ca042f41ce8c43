"""What ``cppo evaluate`` shows a user: its defaults in ``--help``, and a progress bar whose running
accuracy is kept apart by image condition (blank images score lower by design: one figure over
all conditions would mean nothing)."""

from __future__ import annotations

import re
from pathlib import Path

from cppo_lightning.evaluation.command import build_parser, main
from tests.e2e.test_evaluate import small_synthetic


def test_help_shows_the_defaults():
    text = " ".join(build_parser().format_help().split())  # unwrapped
    for option, default in [
        ("--samples K responses per prompt (k)", "16"),
        ("--temperature T sampling temperature; 0 = greedy", "1.0"),
        ("--top-p TOP_P nucleus sampling mass", "1.0"),
        ("--batch-size BATCH_SIZE prompts per generate call (x K responses)", "8"),
        ("--seed SEED seed of sampling and of the shuffle", "0"),
        ("--images COND [COND ...] image conditions:", None),
    ]:
        assert option in text
        if default is not None:
            assert f"{option} (default: {default})" in text
    assert "(default: original)" in text
    assert "(default: the set's, else 2048)" in text  # said once, not "(default: None)" too
    assert "(default: None)" not in text and "(default: False)" not in text


def test_the_progress_bar_keeps_each_condition_apart(tmp_path: Path, capsys):
    eval_file = small_synthetic(tmp_path, rows=4)
    payload = main(
        [
            "builtin:tiny-qwen2.5-vl",
            "--eval",
            eval_file,
            "--output",
            str(tmp_path / "out"),
            "--samples",
            "1",
            "--temperature",
            "0",
            "--batch-size",
            "2",
            "--images",
            "original",
            "blank",
        ]
    )
    assert payload is not None
    shown = capsys.readouterr()
    bar = (shown.out + shown.err).replace("\r", "\n")
    final = [line for line in bar.splitlines() if "Evaluating prompts" in line][-1]
    accuracy = {r["images"]: r["accuracy"] for r in payload["results"]}
    for condition in ("original", "blank"):
        match = re.search(rf"{condition}=(\d\.\d+)", final)
        assert match, final
        assert float(match.group(1)) == round(accuracy[condition], 3)
    assert "accuracy=" not in final  # no figure over both conditions
