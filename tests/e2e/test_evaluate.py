"""``cppo evaluate`` end to end on the embedded model: the results schema, the same numbers again
for the same seed, after an interruption, from a fit checkpoint and from its export; greedy
accuracy; bad input refused before any work, nothing written lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cppo_lightning.cli import main as cli_main
from cppo_lightning.data.synthetic import KINDS
from cppo_lightning.evaluation.command import main
from cppo_lightning.evaluation.sets import load_eval_set
from cppo_lightning.policy import load_policy, load_processor
from cppo_lightning.tiny import heldout_accuracy
from tests.e2e.test_fit import _fit_args

REPO = Path(__file__).resolve().parents[2]
SCHEMA = {"model", "samples", "temperature", "seed", "results"}
RESULT = {
    "benchmark",
    "images",
    "n",
    "k",
    "accuracy",
    "std",
    "ci95",
    "pass_at_k",
    "format_rate",
    "response_length",
    "answer_kept",
    "by_category",
}


def small_synthetic(tmp_path: Path, rows: int = 12) -> str:
    """configs/eval/synthetic.yaml on its first ``rows`` held-out prompts."""
    text = (REPO / "configs" / "eval" / "synthetic.yaml").read_text()
    path = tmp_path / "synthetic.yaml"
    path.write_text(text + f"num_rows: {rows}\n")
    return str(path)


def _run(model: str, eval_file: str, output: Path, *extra: str) -> dict:
    payload = main(
        [model, "--eval", eval_file, "--output", str(output), "--no-progress-bar", *extra]
    )
    assert payload is not None
    return payload


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One sampled evaluation under every condition (k = 2, batches of 4 prompts)."""
    root = tmp_path_factory.mktemp("sampled")
    eval_file = small_synthetic(root)
    args = ("--samples", "2", "--batch-size", "4", "--images", "original", "blank", "mean")
    args += ("shuffled", "preserving", "removing")
    payload = _run("builtin:tiny-qwen2.5-vl", eval_file, root / "out", *args)
    return root, eval_file, args, payload


def test_results_follow_the_schema(sampled):
    root, _, _, payload = sampled
    on_disk = json.loads((root / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    assert set(on_disk) >= SCHEMA and on_disk["samples"] == 2 and on_disk["temperature"] == 1.0
    results = on_disk["results"]
    assert [r["images"] for r in results] == [
        "original", "blank", "mean", "shuffled", "preserving", "removing"
    ]  # fmt: skip
    for r in results:
        assert set(r) >= RESULT
        assert r["benchmark"] == "synthetic" and r["n"] == 12 and r["k"] == 2
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert set(r["by_category"]) <= set(KINDS)
        assert (r["answer_kept"] is None) == (r["images"] == "original")
        assert r["rows"] == 12 and r["dropped"] == {}
    lines = (root / "out" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 12 * 2 * 6
    record = json.loads(lines[0])
    assert {"prompt_id", "sample", "response", "answer", "correct"} <= set(record)
    csv = (root / "out" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("benchmark,images,n,k,accuracy,std") and len(csv) == 7
    assert "| synthetic | blank |" in (root / "out" / "results.md").read_text()
    assert list((root / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others(sampled, tmp_path):
    _, eval_file, args, payload = sampled
    again = _run("builtin:tiny-qwen2.5-vl", eval_file, tmp_path / "again", *args)
    assert again == payload
    other = _run("builtin:tiny-qwen2.5-vl", eval_file, tmp_path / "seed1", *args, "--seed", "1")
    assert other["results"] != payload["results"]


def test_an_interrupted_run_continues_where_it_stopped(sampled, tmp_path):
    root, eval_file, args, payload = sampled
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(root / "out" / "run.json", out / "run.json")
    lines = (root / "out" / "responses.jsonl").read_text().splitlines(keepends=True)
    kept = lines[:37]  # part of a unit: it is redone, its duplicates count once
    (out / "responses.jsonl").write_text("".join(kept) + lines[37][:25])  # a cut-off line
    resumed = _run("builtin:tiny-qwen2.5-vl", eval_file, out, *args)
    assert resumed == payload
    assert (out / "responses.jsonl").read_text().startswith("".join(kept))


def test_greedy_decoding_gives_greedy_accuracy(tmp_path):
    eval_file = small_synthetic(tmp_path)
    payload = _run(
        "builtin:tiny-qwen2.5-vl", eval_file, tmp_path / "greedy",
        "--samples", "1", "--temperature", "0", "--batch-size", "4",
    )  # fmt: skip
    (result,) = payload["results"]
    rows = load_eval_set(eval_file).raw_rows()
    model = load_policy("builtin:tiny-qwen2.5-vl").eval()
    processor = load_processor("builtin:tiny-qwen2.5-vl")
    expected = heldout_accuracy(model, processor, rows, batch_size=4, max_new_tokens=48)
    assert result["accuracy"] == pytest.approx(expected) and result["std"] == 0.0
    assert result["pass_at_k"] == pytest.approx(expected)


def test_a_fit_checkpoint_and_its_export_score_the_same(tmp_path):
    cli = cli_main(_fit_args(tmp_path / "fit", "--model.lora={r: 4, alpha: 8}"))
    log_dir = Path(cli.trainer.log_dir)
    checkpoint = log_dir / "checkpoints" / "trained.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    eval_file = small_synthetic(tmp_path, rows=8)
    args = ("--samples", "1", "--temperature", "0", "--images", "original", "removing")
    from_ckpt = _run(str(checkpoint), eval_file, tmp_path / "ckpt", *args)
    from_hf = _run(str(log_dir / "hf_policy"), eval_file, tmp_path / "hf", *args)
    assert from_ckpt["results"] == from_hf["results"]
    assert from_ckpt["model"] == str(checkpoint)


def _fails(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as error:
        main(list(argv))
    return str(error.value) + capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    eval_file = small_synthetic(tmp_path, rows=4)
    model = "builtin:tiny-qwen2.5-vl"
    out = str(tmp_path / "out")
    assert "--samples must be >= 1" in _fails(capsys, model, "--eval", eval_file, "--output", out,
                                              "--samples", "0")  # fmt: skip
    message = _fails(capsys, model, "--eval", eval_file, "--output", out, "--images", "noisy")
    assert "unknown image condition" in message and "shuffled" in message
    message = _fails(capsys, str(tmp_path / "nope"), "--eval", eval_file, "--output", out)
    assert "no model at" in message
    assert "no model at" in _fails(capsys, str(tmp_path / "x.ckpt"), "--eval", eval_file,
                                   "--output", out)  # fmt: skip
    blocked = tmp_path / "file"
    blocked.write_text("")
    message = _fails(capsys, model, "--eval", eval_file, "--output", str(blocked / "sub"))
    assert "cannot write to --output" in message
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text(json.dumps({"question": "q", "image": "a.png"}) + "\n")
    message = _fails(capsys, model, "--eval", f"{{path: {no_answer}}}", "--output", out)
    assert "no column 'answer' for answer_column" in message
    assert not (tmp_path / "out" / "responses.jsonl").exists()


def test_other_settings_never_overwrite_an_evaluation(tmp_path, capsys):
    eval_file = small_synthetic(tmp_path, rows=4)
    out = tmp_path / "out"
    args = ("--samples", "1", "--temperature", "0")
    _run("builtin:tiny-qwen2.5-vl", eval_file, out, *args)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    message = _fails(capsys, "builtin:tiny-qwen2.5-vl", "--eval", eval_file, "--output", str(out),
                     "--samples", "2")  # fmt: skip
    assert "holds an evaluation with other settings" in message and "samples: 1 -> 2" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_engine_option_samples_through_that_engine(tmp_path, capsys):
    """``--engine`` (with ``--engine-args``) samples every unit through that engine, records it
    in run.json and results.json, and refuses to mix its responses with another engine's."""
    model = "builtin:tiny-qwen2.5-vl"
    eval_file = small_synthetic(tmp_path, rows=4)
    args = ("--samples", "2", "--batch-size", "2", "--images", "original", "blank")
    default = _run(model, eval_file, tmp_path / "default", *args)
    log = tmp_path / "samples.jsonl"
    engine = ("--engine", "tests.helpers.engines.RecordingEngine")
    engine += ("--engine-args", f"{{tag: eval, log: {log}}}")
    recorded = _run(model, eval_file, tmp_path / "recorded", *args, *engine)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [{"num_samples": 2, "prompts": 2}] * 4  # 2 batches x 2 conditions
    # RecordingEngine samples with HF generate, as the default engine does: the same responses.
    assert recorded["results"] == default["results"]
    responses = [(tmp_path / d / "responses.jsonl").read_text() for d in ("default", "recorded")]
    assert responses[0] == responses[1]
    assert default["engine"] == {"class_path": "cppo_lightning.rollout.HFGenerate", "init_args": {}}
    settings = {
        "class_path": "tests.helpers.engines.RecordingEngine",
        "init_args": {"tag": "eval", "log": str(log)},
    }
    assert recorded["engine"] == settings
    assert json.loads((tmp_path / "recorded" / "run.json").read_text())["engine"] == settings
    # Another engine's responses never join these.
    into_default = ("--output", str(tmp_path / "default"))
    message = _fails(capsys, model, "--eval", eval_file, *into_default, *args, *engine)
    assert "holds an evaluation with other settings" in message and "engine: {" in message
    # A run.json from before --engine existed sampled with HF generate: it continues as that.
    run_file = tmp_path / "default" / "run.json"
    legacy = json.loads(run_file.read_text())
    del legacy["engine"]
    run_file.write_text(json.dumps(legacy))
    assert _run(model, eval_file, tmp_path / "default", *args) == default
    message = _fails(capsys, model, "--eval", eval_file, "--output", str(tmp_path / "bad"),
                     "--engine", "cppo_lightning.rollout.Sampling")  # fmt: skip
    assert "is not a subclass of cppo_lightning.rollout.RolloutEngine" in message
