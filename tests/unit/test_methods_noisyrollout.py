"""NoisyRollout at the ``rollout.view`` seam: the parts of a group, the annealed timestep at given
steps, the seeded noise, the merge of the parts' responses, and which image the training forward
sees (the clean one). Values derived by hand in the comments."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cppo_lightning.callbacks import RolloutCallback
from cppo_lightning.logprobs import Scoring, score_responses
from cppo_lightning.methods import NoisyRollout
from cppo_lightning.perturbations import DiffusionNoise
from cppo_lightning.records import PromptBatch
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import HFGenerate, Samples, Sampling, collect_rollouts, merge_parts


def _prompts(rows: list[int]) -> PromptBatch:
    """One 8 x 8 grey image per prompt (value 0.5), dataset rows ``rows``."""
    return PromptBatch(
        input_ids=torch.ones(len(rows), 3, dtype=torch.long),
        attention_mask=torch.ones(len(rows), 3, dtype=torch.long),
        vision={"pixel_values": torch.zeros(len(rows), 2)},
        vision_layout={"pixel_values": "prompt"},
        image_counts=torch.ones(len(rows), dtype=torch.long),
        mm_token_type_ids=None,
        columns={"answer": ["x"] * len(rows)},
        row_index=torch.tensor(rows),
        images=[torch.full((3, 8, 8), 0.5) for _ in rows],
    )


class _Encoder:
    """Stands in for the processor: records the images, 'encodes' each as its mean."""

    def __init__(self) -> None:
        self.images: list[list[torch.Tensor]] = []

    def __call__(self, images):  # type: ignore[no-untyped-def]
        self.images.append([i.clone() for i in images])
        return {"pixel_values": torch.stack([i.mean().repeat(2) for i in images])}


# ------------------------------------------------------------------ parts
@pytest.mark.parametrize(
    ("num_noisy", "group_size", "sizes"),
    [(None, 8, [4, 4]), (None, 12, [6, 6]), (None, 5, [3, 2]), (3, 8, [5, 3]), (1, 2, [1, 1])],
)
def test_parts_split_each_group_clean_then_noisy(num_noisy, group_size, sizes):
    # Default: half the group noisy (the authors' 6 + 6 of 12; 4 + 4 of G = 8), rounded down.
    encoder = _Encoder()
    parts = NoisyRollout(num_noisy=num_noisy).parts(_prompts([0, 1]), group_size, 1, 10, encoder)
    assert [p.num_samples for p in parts] == sizes
    assert parts[0].vision is None  # the clean part: the prompts' own images
    assert parts[1].vision is not None and parts[1].vision["pixel_values"].shape == (2, 2)


@pytest.mark.parametrize(("num_noisy", "group_size"), [(8, 8), (9, 8), (None, 1)])
def test_a_group_keeps_a_clean_and_a_noisy_response(num_noisy, group_size):
    with pytest.raises(ValueError, match="leaves no clean or no noisy response"):
        NoisyRollout(num_noisy=num_noisy).parts(_prompts([0]), group_size, 1, 10, _Encoder())


@pytest.mark.parametrize("bad", [{"num_noisy": 0}, {"decay": "cosine"}, {"initial_timestep": 1000}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=r"rollout\.view"):
        NoisyRollout(**bad)


def test_a_batch_without_images_is_refused():
    with pytest.raises(ValueError, match="carry_images"):
        NoisyRollout().parts(_prompts([0])._replace(images=None), 8, 1, 10, _Encoder())


# ------------------------------------------------------------------ the schedule
@pytest.mark.parametrize(
    ("step", "total", "expected"),
    [
        # sigmoid, coef 30, midpoint 40, t0 = 500; decay = 1 / (1 + exp(30 (step - 40) / total)):
        (1, 300, 490),  # z = 30 * (1 - 40) / 300 = -3.9: 1 / (1 + e^-3.9) = 0.98015 -> 490
        (40, 300, 250),  # z = 0: 0.5 -> 250
        (80, 300, 8),  # z = 4: 1 / (1 + e^4) = 0.017986 -> int(8.99) = 8
        (300, 300, 0),  # z = 26: 2.5e-12 -> 0
        (1, 2, 500),  # z = 30 * (1 - 40) / 2 = -585: decay 1.0 in float -> 500
    ],
)
def test_the_timestep_anneals_as_the_authors_sigmoid(step, total, expected):
    assert NoisyRollout().timestep_at(step, total) == expected


def test_the_callback_counts_rollout_batches_from_the_trainer():
    # base.yaml: max_steps 600, 2 optimizer steps per rollout batch -> 300 rollout batches.
    # After 78 optimizer steps the next rollout batch is the 40th: timestep 250 (see above).
    view = NoisyRollout()
    encoder = _Encoder()
    trainer = SimpleNamespace(
        global_step=78,
        max_steps=600,
        datamodule=SimpleNamespace(
            carry_images=lambda: None, encode_view=lambda images, prompts: encoder(images)
        ),
    )
    module = SimpleNamespace(trainer=trainer, optimizer_steps_per_batch=2)
    callback = RolloutCallback(group_size=8, view=view)
    parts = callback.view_parts(module, _prompts([3]))  # type: ignore[arg-type]
    assert view.timestep == 250 and [p.num_samples for p in parts] == [4, 4]


# ------------------------------------------------------------------ the noise
def test_the_noise_is_seeded_by_row_and_step_and_leaves_the_rng_alone():
    view = NoisyRollout(initial_timestep=500, decay="constant")
    encoder = _Encoder()
    state = torch.get_rng_state()
    for step in (3, 3, 4):
        view.parts(_prompts([7, 8]), 8, step, 10, encoder)
    assert torch.equal(torch.get_rng_state(), state)
    (a7, a8), (b7, b8), (c7, _) = encoder.images
    assert torch.equal(a7, b7) and torch.equal(a8, b8)  # same (row, step): same noise
    assert not torch.equal(a7, a8)  # another row
    assert not torch.equal(a7, c7)  # another step
    # The DDPM step at t = 500 on a 0.5 image: mean sqrt(abar) * 0.5 = 0.863 * 0.5 = 0.43 before
    # the clamp, spread sqrt(1 - abar) = 0.505 (docs/methods-sources.md).
    assert a7.shape == (3, 8, 8) and float(a7.min()) >= 0.0 and float(a7.max()) <= 1.0
    assert 0.3 < float(a7.std()) < 0.6
    # Replaying the module's draw with the same seed gives the same image.
    noise = DiffusionNoise(timestep=500)
    from cppo_lightning.perturbations import apply_seeded, view_seed

    assert torch.equal(
        apply_seeded(noise, torch.full((3, 8, 8), 0.5), view_seed(0, 7, 3, "noisy")), a7
    )


# ------------------------------------------------------------------ merging the parts
def test_merge_parts_puts_each_prompts_parts_together_in_order():
    # 2 prompts; part 0 has 2 responses per prompt (rows p0a p0b p1a p1b), part 1 one
    # (rows p0c p1c), shorter. Merged per prompt: p0a p0b p0c | p1a p1b p1c.
    part0 = Samples(
        torch.tensor([[1, 1, 1], [2, 2, 0], [3, 0, 0], [4, 4, 4]]),
        torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
        torch.full((4, 3), -1.0),
    )
    part1 = Samples(torch.tensor([[5], [6]]), torch.tensor([[1], [1]]), torch.full((2, 1), -2.0))
    merged, generated_from = merge_parts([part0, part1], [2, 1], pad_token_id=9)
    assert merged.response_ids.tolist() == [
        [1, 1, 1],
        [2, 2, 0],
        [5, 9, 9],
        [3, 0, 0],
        [4, 4, 4],
        [6, 9, 9],
    ]
    assert merged.response_mask.sum(1).tolist() == [3, 2, 1, 1, 3, 1]
    assert merged.sampler_logp[2].tolist() == [-2.0, 0.0, 0.0]
    assert generated_from.tolist() == [0, 0, 1, 0, 0, 1]


def test_stats_report_the_timestep_and_each_parts_mean_reward():
    view = NoisyRollout()
    view.timestep = 123
    # Groups of 4: clean, clean, noisy, noisy. Clean rewards 1, 0, 1, 1 -> 0.75;
    # noisy 0, 0, 1, 0 -> 0.25.
    rollout = SimpleNamespace(
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]),
        generated_from=torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]),
    )
    assert view.stats(rollout) == {  # type: ignore[arg-type]
        "noise_timestep": 123.0,
        "reward_mean_clean": 0.75,
        "reward_mean_noisy": 0.25,
    }
    assert math.isnan(
        view.stats(SimpleNamespace(rewards=torch.ones(2), generated_from=None))[  # type: ignore[arg-type]
            "reward_mean_noisy"
        ]
    )


# ------------------------------------------------------------------ which image trains
class _Recording(HFGenerate):
    def __init__(self) -> None:
        self.visions: list[torch.Tensor] = []

    def sample(self, policy, processor, prompts, *args, **kwargs) -> Samples:  # type: ignore[no-untyped-def]
        self.visions.append(prompts.vision["pixel_values"].clone())
        return super().sample(policy, processor, prompts, *args, **kwargs)


def test_generation_sees_the_noisy_image_and_the_training_forward_the_clean_one(tiny_model_dir):
    """Pins the direction: the noisy part is *generated* from the noisy pixels; the rollout
    batch keeps the clean pixels, and the update's forward (score_responses on the batch's
    prompts) gives the clean image's log-probs, not the noisy one's."""
    from cppo_lightning.data import VisionLanguageDataModule
    from cppo_lightning.data.synthetic import SyntheticShapes
    from cppo_lightning.policy import load_policy

    dm = VisionLanguageDataModule(
        SyntheticShapes(num_train=4, num_val=2, seed=0),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=2,
    )
    dm.setup("fit")
    dm.carry_images()
    assert dm.collate is not None
    prompts = dm.collate([dm.splits["train"][i] | {"__row_index__": i} for i in range(2)])
    clean = prompts.vision["pixel_values"].clone()
    view = NoisyRollout(decay="constant")
    parts = view.parts(prompts, 4, 1, 10, lambda images: dm.encode_view(images, prompts))
    noisy = parts[1].vision
    assert noisy is not None and not torch.allclose(noisy["pixel_values"], clean)
    policy = load_policy(str(tiny_model_dir)).eval()
    engine = _Recording()
    torch.manual_seed(0)
    reward = WeightedReward({"zero": lambda c, **_: [0.0] * len(c)}, {"zero": 1.0})
    rollout = collect_rollouts(
        policy,
        dm.collate.processor,
        prompts,
        reward,
        Sampling(6),
        group_size=4,
        engine=engine,
        parts=parts,
    )
    # Generation: part 0 from the clean pixels, part 1 from the noisy ones.
    assert torch.equal(engine.visions[0], clean)
    assert torch.equal(engine.visions[1], noisy["pixel_values"])
    assert rollout.generated_from is not None
    assert rollout.generated_from.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # Training: the batch carries the clean pixels, and its forward is the clean image's.
    assert torch.equal(rollout.prompts.vision["pixel_values"], clean)
    scoring = Scoring(1.0)
    args = (rollout.prompts, rollout.prompt_index, rollout.response_ids, rollout.response_mask)
    with torch.no_grad():
        trained = score_responses(policy, *args, scoring).logps()
        on_clean = score_responses(policy, *args, scoring, prompts.vision).logps()
        on_noisy = score_responses(policy, *args, scoring, noisy).logps()
    assert torch.equal(trained, on_clean)
    assert not torch.allclose(trained, on_noisy)
