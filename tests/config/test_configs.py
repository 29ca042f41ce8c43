"""Every shipped YAML parses and instantiates; bad values fail saying what to change."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from cppo_lightning.callbacks import RolloutCallback
from cppo_lightning.cli import main
from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.module import CPPOModule

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "base.yaml"
# Fit configs; configs/eval/ holds evaluation sets (tests/unit/test_eval_sets.py reads each).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "eval")


def _instantiate(*args: str):  # type: ignore[no-untyped-def]
    return main(["--config", str(BASE), *args, "--trainer.logger=false"], run=False)


# Hub checkpoints named by configs/models and configs/paper -> the tiny family that stands in
# for them offline (same model class, built from a config with random weights).
_TINY_FOR = {
    "Qwen/Qwen2-VL": "qwen2_vl",
    "Qwen/Qwen2.5-VL": "qwen2_5_vl",
    "Qwen/Qwen3-VL": "qwen3_vl",
    "HuggingFaceTB/SmolVLM": "idefics3",
    "llava-hf/llava-1.5": "llava",
}


def _stack(path: Path) -> list[Path]:
    """The configs a file is documented to be stacked on, then the file itself."""
    if path == BASE:
        return [BASE]
    if path.parent.name == "paper" and path.name != "virl39k.yaml":
        return [BASE, path.parent / "virl39k.yaml", path]
    return [BASE, path]


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.helpers.tiny_families import FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("tiny-families")
    return {family: build_tiny_family(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_parses_and_instantiates(path: Path, tiny_families):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    merged: dict = {}
    for config in _stack(path):
        for key, value in (yaml.safe_load(config.read_text()) or {}).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    args = [arg for config in _stack(path)[1:] for arg in ("--config", str(config))]
    name = merged["model"]["model_name_or_path"]
    if not name.startswith("builtin:"):  # a hub model: its tiny stand-in of the same class
        family = next(tiny for prefix, tiny in _TINY_FOR.items() if name.startswith(prefix))
        args.append(f"--model.model_name_or_path={tiny_families[family]}")
    strategy = merged["trainer"].get("strategy")
    if merged["trainer"].get("accelerator") == "gpu":
        # No GPU here: the trainer runs on CPU, and the GPU strategy is built on its own.
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]
        if isinstance(strategy, dict):
            parser = ArgumentParser()
            parser.add_argument("--strategy", type=Strategy)
            built = parser.instantiate(parser.parse_object({"strategy": strategy})).strategy
            assert type(built).__name__ == strategy["class_path"].rsplit(".", 1)[1]
    cli = _instantiate(*args)
    assert isinstance(cli.model, CPPOModule)
    assert isinstance(cli.datamodule, VisionLanguageDataModule)
    assert any(isinstance(cb, RolloutCallback) for cb in cli.trainer.callbacks)
    cli.model.configure_model()
    assert cli.model.policy is not None
    if cli.model.lora is not None:
        assert cli.model.reference is None and any(
            "lora_" in n for n, p in cli.model.policy.named_parameters() if p.requires_grad
        )
    batch_size, mini = cli.datamodule.batch_size, cli.model.mini_batch_size
    assert mini is None or batch_size % mini == 0, "data.batch_size must split into mini-batches"


def test_linked_values_have_one_source():
    cli = _instantiate("--rollout.group_size=6", "--rollout.temperature=0.7")
    assert cli.model.group_size == 6 and cli.model.temperature == 0.7
    with pytest.raises(SystemExit):  # a linked target cannot be set on its own
        _instantiate("--model.group_size=6")


def test_print_config_with_comments_documents_the_knobs():
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(BASE), "--print_config=comments"])
    text = out.getvalue()
    assert "# beta, weight of the KL to the frozen reference" in text
    assert "# G, responses sampled per prompt" in text
    assert "group_size: 8" in text


def test_help_documents_every_knob():
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(BASE), "--help"])
    text = out.getvalue()
    for knob in (
        "--model.kl_coef",
        "--model.clip_high",
        "--rollout.group_size",
        "--data.batch_size",
    ):
        assert knob in text
    assert "weight of the KL to the frozen reference" in text


def test_reward_swapped_from_the_command_line():
    cli = _instantiate(
        "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward}",
        "--model.reward.init_args.weights={length: 1.0}",
    )
    total, terms = cli.model.reward(["ab", "abcd"], {"answer": ["1", "2"]})
    assert total.tolist() == pytest.approx([0.02, 0.04]) and list(terms) == ["length"]


def test_reward_swapped_by_a_yaml_overlay(tmp_path):
    overlay = tmp_path / "reward.yaml"
    overlay.write_text(
        "model:\n  reward:\n    init_args:\n"
        "      functions: {accuracy: cppo_lightning.rewards.accuracy_reward}\n"
        "      weights: {accuracy: 1.0}\n"
    )
    cli = _instantiate("--config", str(overlay))
    assert list(cli.model.reward.functions) == ["accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rollout.group_size=1"], "must be >= 2 for group advantages"),
        (["--model.dual_clip=0.5"], "dual_clip must be > 1"),
        (["--model.reward.init_args.weights={accuracy: 1.0}"], "missing weights for ['format']"),
        (["--data.batch_size=0"], "data.batch_size"),
        (["--rollout.generation_batch_size=4"], "smaller than one group"),
        (["--data.min_pixels=5000", "--data.max_pixels=4000"], "is larger than data.max_pixels"),
        (["--data.max_images=0"], "data.max_images must be >= 1"),
    ],
)
def test_bad_values_say_what_to_change(args, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as raised:
        _instantiate(*args)
    shown = str(raised.value) + capsys.readouterr().err
    assert message in shown


def test_unknown_class_path_is_named(capsys):
    with pytest.raises(SystemExit):
        _instantiate("--data.dataset.class_path=cppo_lightning.data.NoSuchDataset")
    assert "NoSuchDataset" in capsys.readouterr().err


def test_misspelled_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        _instantiate("--model.kl_coeff=0.1")
    assert "kl_coeff" in capsys.readouterr().err


def test_console_script_exits_zero():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from cppo_lightning.cli import entry_point; entry_point()",
         "fit", "--config", str(BASE), "--print_config"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "group_size: 8" in done.stdout


def test_base_runs_cppo_and_the_overlays_swap_the_objective():
    from cppo_lightning.callbacks import CPLWeight, PerceptionTokens
    from cppo_lightning.perception import ContrastivePerception, ImplicitPerception
    from cppo_lightning.perturbations import OneOf, PatchMask

    cli = _instantiate()
    assert isinstance(cli.model.perception_loss, ContrastivePerception)
    assert {type(cb) for cb in cli.trainer.callbacks} >= {PerceptionTokens, CPLWeight}
    assert isinstance(cli.datamodule.preserving_view, OneOf)
    grpo = _instantiate("--config", str(REPO / "configs/experiments/grpo.yaml"))
    assert grpo.model.perception_loss is None and grpo.datamodule.view_names == ()
    papo = _instantiate("--config", str(REPO / "configs/experiments/papo.yaml"))
    assert isinstance(papo.model.perception_loss, ImplicitPerception)
    assert isinstance(papo.datamodule.removing_view, PatchMask)
    assert papo.datamodule.view_names == ("removing",)


def test_a_perturbation_overlay_or_flag_swaps_the_view():
    from cppo_lightning.perturbations import OneOf, PatchMask, ZoomCrop

    cli = _instantiate("--config", str(REPO / "configs/perturbations/patch-mask.yaml"))
    assert isinstance(cli.datamodule.removing_view, PatchMask)
    assert cli.datamodule.removing_view.patch_size == 14
    assert isinstance(cli.datamodule.preserving_view, OneOf)  # the other view is untouched
    flag = _instantiate("--data.removing_view=cppo_lightning.perturbations.ZoomCrop")
    assert isinstance(flag.datamodule.removing_view, ZoomCrop)


def test_the_paper_recipe_keeps_the_spec_preserving_view_that_base_narrows():
    """base.yaml narrows I+'s colour jitter for its colour task; configs/paper keeps the paper's."""
    import yaml

    from cppo_lightning.perturbations import information_preserving

    def jitter(path: Path) -> dict:
        members = yaml.safe_load(path.read_text())["data"]["preserving_view"]["init_args"][
            "members"
        ]
        (found,) = (m["init_args"] for m in members if m["class_path"].endswith(".ColorJitter"))
        return found

    spec = information_preserving().members[0]
    paper = jitter(REPO / "configs" / "paper" / "virl39k.yaml")
    for name in ("brightness", "contrast", "saturation"):
        assert tuple(paper[name]) == tuple(getattr(spec, name)), name
    assert tuple(jitter(BASE)["saturation"]) != tuple(spec.saturation)


def test_the_paper_recipe_detects_with_the_spec_score_that_base_replaces():
    """base.yaml ranks by the raw entropy shift for its tiny model; stacked on it, configs/paper
    gives back the paper's normalised score and rho 0.5 (init_args merge across stacked files)."""
    from cppo_lightning.callbacks import PerceptionTokens

    def selector(*args: str):  # type: ignore[no-untyped-def]
        cli = _instantiate(*args)
        (found,) = (cb for cb in cli.trainer.callbacks if isinstance(cb, PerceptionTokens))
        return found.selector

    assert selector().score == "raw"
    paper = selector(
        "--config",
        str(REPO / "configs" / "paper" / "virl39k.yaml"),
        "--model.model_name_or_path=builtin:tiny-qwen2.5-vl",
    )
    assert (paper.score, paper.top_fraction) == ("normalized", 0.5)
