"""Real-dataset layouts: ViRL39K-style parquet and Geometry3K-style jsonl/parquet files, read by
HFDataset, checked row by row, and trained on for a step."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from cppo_lightning.cli import main
from cppo_lightning.data import DatasetSpec, HFDataset, VisionLanguageDataModule
from tests.e2e.test_fit import BASE


def _image(path: Path, color: tuple[int, int, int], size=(112, 112)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def _virl39k(root: Path) -> Path:
    """ViRL39K's layout: relative image paths in a list column, answers boxed, <image> in text."""
    images = root / "images"
    rows = []
    for i in range(8):
        _image(images / f"{i}.png", (30 * i, 100, 200))
        rows.append(
            {
                "qid": f"q{i}",
                "question": f"<image>How many sides does shape {i} have?",
                "answer": f"\\boxed{{{i + 3}}}",
                "image": [f"images/{i}.png"],
                "category": "geometry",
                "source": "synthetic",
                "PassRate_32BTrained": 0.5,
            }
        )
    (images / "broken.png").write_bytes(b"this is not a png")
    rows.append({**rows[0], "qid": "bad", "image": ["images/broken.png"]})
    rows.append({**rows[0], "qid": "gone", "image": ["images/missing.png"]})
    _image(images / "second.png", (0, 0, 0))
    rows.append({**rows[1], "qid": "two", "image": ["images/1.png", "images/second.png"]})
    rows.append({**rows[2], "qid": "long", "question": "<image>" + "why " * 400})
    path = root / "virl39k.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _geometry3k_jsonl(root: Path) -> Path:
    """Geometry3K's layout: `problem`, `answer` (bare), `images` (a list)."""
    path = root / "geometry3k" / "test.jsonl"
    path.parent.mkdir(parents=True)
    with path.open("w") as handle:
        for i in range(4):
            _image(path.parent / f"g{i}.png", (200, 30 * i, 0), size=(96, 128))
            row = {
                "problem": f"<image>Find x in figure {i}.",
                "answer": str(i),
                "images": [f"g{i}.png"],
            }
            handle.write(json.dumps(row) + "\n")
    return path


def _one_step(tmp_path: Path, overlay: dict, *extra: str):  # type: ignore[no-untyped-def]
    """One CPPO step of the base config with ``overlay`` (a YAML mapping) stacked on it."""
    config = tmp_path / "overlay.yaml"
    config.write_text(yaml.safe_dump(overlay))
    return main(
        [
            "fit",
            "--config",
            BASE,
            "--config",
            str(config),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
            "--rollout.max_new_tokens=8",
            "--model.val_samples=1",
            "--model.mini_batch_size=null",  # one optimizer step for the overlay's batch
            *extra,
        ]
    )


def test_virl39k_rows_are_checked_and_counted(tmp_path):
    source = HFDataset(
        train=DatasetSpec(path=str(_virl39k(tmp_path))),
        validation=DatasetSpec(path=str(_geometry3k_jsonl(tmp_path))),
    )
    module = VisionLanguageDataModule(
        dataset=source, batch_size=2, max_prompt_length=256, max_images=1
    )
    module.setup("fit")
    report = module.reports["train"]
    assert dict(report) == {
        "unreadable image": 1,
        "image file missing": 1,
        "more than 1 image(s) (data.max_images)": 1,
        "prompt longer than 256 tokens (data.max_prompt_length)": 1,
    }
    assert report.kept == 8 and module.reports["validation"].kept == 4
    batch = next(iter(module.val_dataloader()))
    assert batch.columns["answer"] == ["0", "1", "2", "3"]
    assert module.splits["train"][0]["answer"] == "\\boxed{3}"


def test_multi_image_rows_train_where_the_family_allows(tmp_path):
    train = DatasetSpec(path=str(_virl39k(tmp_path)))
    source = HFDataset(train=train, validation=train)
    module = VisionLanguageDataModule(dataset=source, batch_size=1)
    module.setup("fit")  # Qwen2.5-VL takes several images per prompt: the 2-image row stays
    assert dict(module.reports["train"]) == {"unreadable image": 1, "image file missing": 1}
    batches = [b for b in module.train_dataloader() if b.image_counts.tolist() == [2]]
    assert len(batches) == 1
    assert batches[0].vision["image_grid_thw"].shape[0] == 2
    assert (batches[0].mm_token_type_ids == 1).sum() == 2 * 16  # both images' tokens


def test_geometry3k_parquet_with_embedded_images(tmp_path):
    rows = {
        "problem": ["<image>Find y.", "<image>Find z."],
        "answer": ["5", "7"],
        "images": [[Image.new("RGB", (64, 80), "red")], [Image.new("RGB", (80, 64), "blue")]],
    }
    features = datasets.Features(
        problem=datasets.Value("string"),
        answer=datasets.Value("string"),
        images=datasets.List(datasets.Image()),
    )
    path = tmp_path / "test-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    split = DatasetSpec(path=str(path)).load()
    assert split.column_names == ["problem", "answer", "images"]
    renamed = DatasetSpec(path=str(path), columns={"question": "problem", "image": "images"}).load()
    assert renamed.column_names == ["question", "answer", "image"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['img'\] named in `columns`"):
        DatasetSpec(path=str(path), columns={"image": "img"}).load()


def test_a_cppo_step_from_virl39k_and_geometry3k_files(tmp_path):
    overlay = {
        "data": {
            "dataset": {
                "class_path": "cppo_lightning.data.HFDataset",
                "init_args": {
                    "train": {"path": str(_virl39k(tmp_path))},
                    "validation": {"path": str(_geometry3k_jsonl(tmp_path))},
                },
            },
            "instruction": "Think in <think></think>, then answer in \\boxed{}.",
            "max_prompt_length": 256,
            "max_images": 1,
            "max_pixels": 112 * 112,
            "batch_size": 2,
        }
    }
    cli = _one_step(tmp_path, overlay)
    assert cli.model.global_step == 1
    report = json.loads((Path(cli.trainer.log_dir) / "data_report.json").read_text())
    assert report["train"]["kept"] == 8 and report["train"]["rows"] == 12
    assert report["validation"] == {"rows": 4, "kept": 4, "dropped": {}, "examples": {}}


def test_multi_image_rows_are_dropped_for_a_single_image_family(tmp_path):
    from tests.helpers.tiny_families import build_tiny_family

    llava = build_tiny_family("llava", tmp_path / "llava")
    train = DatasetSpec(path=str(_virl39k(tmp_path)))
    module = VisionLanguageDataModule(
        dataset=HFDataset(train=train, validation=train), processor_name_or_path=str(llava)
    )
    module.setup("fit")
    assert module.reports["train"]["multi-image row (LLaVA takes one image per prompt)"] == 1


def test_an_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as handle:
        for i in range(3):
            _image(folder / f"{i}.png", (10 * i, 0, 0))
            handle.write(json.dumps({"file_name": f"{i}.png", "question": "Q?", "answer": str(i)}))
            handle.write("\n")
    split = DatasetSpec(path=str(folder)).load()
    assert len(split) == 3 and {"image", "question", "answer"} <= set(split.column_names)
    module = VisionLanguageDataModule(
        dataset=HFDataset(train=DatasetSpec(path=str(folder)), validation_size=1), batch_size=1
    )
    module.setup("fit")
    assert module.reports["train"].kept == 2 and module.reports["validation"].kept == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_cppo_step_on_prompts_with_one_and_two_images(family, tmp_path):
    from tests.helpers.tiny_families import build_tiny_family

    model_dir = build_tiny_family(family, tmp_path / family)
    images = tmp_path / "images"
    rows = []
    for i in range(8):
        paths = [_image(images / f"{i}-{k}.png", (20 * i, 40 * k, 90)) for k in range(1 + i % 2)]
        question = " ".join(["<image>"] * len(paths)) + f" How many shapes are there in {i}?"
        rows.append({"question": question, "answer": str(i), "images": paths})
    path = tmp_path / "mixed.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    overlay = {
        "data": {
            "dataset": {
                "class_path": "cppo_lightning.data.HFDataset",
                "init_args": {"train": {"path": str(path)}, "validation_size": 2},
            },
            "batch_size": 6,
        }
    }
    cli = _one_step(
        tmp_path,
        overlay,
        f"--model.model_name_or_path={model_dir}",
        "--model.micro_batch_size=5",  # micro-batches cut across prompts with 1 and 2 images
        "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward}",
        "--model.reward.init_args.weights={length: 1.0}",
        "--model.val_accuracy_term=length",
    )
    record = cli.model.last_update
    assert record is not None and record.perception_mask is not None
    prompts = record.rollout.prompts
    assert sorted(set(prompts.image_counts.tolist())) == [1, 2]
    assert prompts.views is not None and len(prompts.views.removing) == sum(
        prompts.image_counts.tolist()
    )


def test_prepare_data_checks_file_rows_once_for_every_rank(tmp_path, monkeypatch):
    import cppo_lightning.data.datamodule as datamodule

    calls = []
    original = datamodule.row_images
    monkeypatch.setattr(datamodule, "row_images", lambda *args: calls.append(1) or original(*args))
    source = HFDataset(
        train=DatasetSpec(path=str(_virl39k(tmp_path))),
        validation=DatasetSpec(path=str(_geometry3k_jsonl(tmp_path))),
    )
    settings = {"dataset": source, "max_prompt_length": 256, "max_images": 1}
    VisionLanguageDataModule(**settings).prepare_data()  # once per node
    checked = len(calls)
    assert checked == 12 + 4
    other_rank = VisionLanguageDataModule(**settings)
    other_rank.setup("fit")  # reads the cached check
    assert len(calls) == checked
    assert dict(other_rank.reports["train"]) == {
        "unreadable image": 1,
        "image file missing": 1,
        "more than 1 image(s) (data.max_images)": 1,
        "prompt longer than 256 tokens (data.max_prompt_length)": 1,
    }
    VisionLanguageDataModule(**{**settings, "max_prompt_length": 1000}).setup("fit")
    assert len(calls) == checked + 12 + 4  # other settings: checked again


def test_bad_dataset_specs_say_what_to_change(tmp_path):
    table = tmp_path / "rows.tsv"
    table.write_text("question\tanswer\n")
    with pytest.raises(ValueError, match=r"give a \.parquet, \.json, \.jsonl or \.csv file"):
        DatasetSpec(path=str(table)).load()
    with pytest.raises(ValueError, match="validation_size rows are held out of train"):
        HFDataset(train=DatasetSpec(path=str(table)), validation_size=0)
    small = HFDataset(train=DatasetSpec(path=str(_virl39k(tmp_path))), validation_size=12)
    with pytest.raises(ValueError, match="cannot hold out validation_size=12 rows of a 12-row"):
        small.load()
