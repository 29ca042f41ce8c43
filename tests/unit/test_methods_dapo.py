"""DAPO at the seams: dynamic sampling (``rollout.filter``: the filter, the pool of rounds, the
rollout callback's loop), the truncation flag and response lengths of the rollout, and
overlong filtering (``model.token_weighting``). Values derived by hand in the comments."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from cppo_lightning.callbacks import RolloutCallback
from cppo_lightning.losses.grpo import policy_loss
from cppo_lightning.methods import DropTruncated, DynamicSampling
from cppo_lightning.perception import MicroBatch
from cppo_lightning.records import ImageViews, PromptBatch, RolloutBatch
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rewards_dapo import OverlongPenalty
from cppo_lightning.rollout import (
    RESPONSE_LENGTH,
    GroupPool,
    Samples,
    collect_rollouts,
    truncated_responses,
)

PAD = 0
G = 2


def _prompts(rows: list[int], lengths: list[int] | None = None, views: bool = True) -> PromptBatch:
    """Prompts whose every field names its dataset row: tokens ``100 + row`` (left-padded to
    the longest of ``lengths``), one image of value ``row``, its 'pixels' ``[row, -row]``; the
    preserving view adds 100 to the image and 1 to the pixels."""
    lengths = lengths or [3] * len(rows)
    width = max(lengths)
    ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ids[i, width - n :] = 100 + row
        attention[i, width - n :] = 1
    images = [torch.full((3, 2, 2), float(row)) for row in rows]
    pixels = torch.tensor([[float(row), -float(row)] for row in rows])
    return PromptBatch(
        input_ids=ids,
        attention_mask=attention,
        vision={"pixel_values": pixels},
        vision_layout={"pixel_values": "prompt"},
        image_counts=torch.ones(len(rows), dtype=torch.long),
        mm_token_type_ids=None,
        columns={"answer": [f"a{row}" for row in rows]},
        row_index=torch.tensor(rows),
        images=images,
        views=(
            ImageViews([i + 100 for i in images], None, {"pixel_values": pixels + 1}, None)
            if views
            else None
        ),
    )


def _rollout(
    rows: list[int], lengths: list[int], rewards: list[float], **prompt_kw
) -> RolloutBatch:
    """G = 2 responses per row; response ``g`` of row ``r`` is ``lengths[i]`` tokens
    ``10 * r + g`` (right-padded with PAD), reward ``rewards[i]``."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = 10 * rows[i // G] + i % G
        mask[i, :n] = 1
    values = torch.tensor(rewards)
    return RolloutBatch(
        prompts=_prompts(rows, **prompt_kw),
        prompt_index=torch.arange(len(rows)).repeat_interleave(G),
        response_ids=ids,
        response_mask=mask,
        texts=[f"r{rows[i // G]}g{i % G}" for i in range(len(lengths))],
        rewards=values,
        reward_terms={"accuracy": values.clone()},
        group_size=G,
        rollout_seconds=1.5,
        sampler_logp=mask * -0.5,
        truncated=torch.tensor([n == width for n in lengths]),
    )


def _rows(rollout: RolloutBatch) -> list[int]:
    assert rollout.prompts.row_index is not None
    return rollout.prompts.row_index.tolist()


# ------------------------------------------------------------------ the filter
def test_dynamic_sampling_keeps_groups_whose_accuracy_varies():
    # G = 4. accuracy by group: (1,0,0,0) varies -> keep; (1,1,1,1) all right -> drop;
    # (0,0,0,0) all wrong -> drop; (0,1,1,1) varies -> keep.
    accuracy = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1.0])
    # format of group 1 varies: (1, 0, 1, 1); the others are all 1.
    fmt = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1.0])
    rollout = SimpleNamespace(
        rewards=0.9 * accuracy + 0.1 * fmt,
        reward_terms={"accuracy": accuracy, "format": fmt},
        group_size=4,
    )
    keep = DynamicSampling().keep(rollout)  # type: ignore[arg-type]
    assert keep.tolist() == [True, False, False, True]
    # On the total (0.9 acc + 0.1 format) the all-correct group 1 has rewards
    # (1.0, 0.9, 1.0, 1.0): not all equal, kept.
    on_total = DynamicSampling(metric="reward").keep(rollout)  # type: ignore[arg-type]
    assert on_total.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match=r"metric='acc' is not a reward term \(\['accuracy', 'fo"):
        DynamicSampling(metric="acc").keep(rollout)  # type: ignore[arg-type]


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_dynamic_sampling_refuses_a_bad_cap(rounds):
    with pytest.raises(ValueError, match="max_rounds must be an int >= 1"):
        DynamicSampling(max_rounds=rounds)


def test_dynamic_sampling_default_cap_is_verls():
    assert DynamicSampling().max_rounds == 10  # recipe max_num_gen_batches=10
    assert DynamicSampling().metric == "accuracy"  # recipe filter_groups.metric=acc


# ------------------------------------------------------------------ records
def test_select_groups_keeps_everything_a_group_carries():
    rollout = _rollout([7, 8, 9], [1, 2, 3, 3, 2, 1], [0, 1, 2, 3, 4, 5])
    picked = rollout.select_groups(torch.tensor([2, 0]))
    # Groups in the order asked: row 9 (responses 4, 5) then row 7 (responses 0, 1).
    assert _rows(picked) == [9, 7]
    assert picked.texts == ["r9g0", "r9g1", "r7g0", "r7g1"]
    assert picked.rewards.tolist() == [4, 5, 0, 1]
    assert picked.prompt_index.tolist() == [0, 0, 1, 1]
    assert picked.truncated is not None and picked.truncated.tolist() == [
        False,
        False,
        False,
        False,
    ]
    # Longest kept response is 2 tokens: the third column (padding for all four) is cut.
    assert picked.response_ids.tolist() == [[90, 90], [91, 0], [70, 0], [71, 71]]
    assert picked.prompts.vision["pixel_values"].tolist() == [[9.0, -9.0], [7.0, -7.0]]
    assert picked.prompts.images is not None
    assert [float(i[0, 0, 0]) for i in picked.prompts.images] == [9.0, 7.0]
    views = picked.prompts.views
    assert views is not None and views.vision_pos is not None and views.preserving is not None
    assert views.vision_pos["pixel_values"].tolist() == [[10.0, -8.0], [8.0, -6.0]]
    assert [float(i[0, 0, 0]) for i in views.preserving] == [109.0, 107.0]


def test_concat_pads_prompts_left_and_responses_right_bit_for_bit():
    first = _rollout([1], [1, 2], [0.5, 0.25])  # prompt of 3 tokens, responses of 1 and 2
    second = _rollout([2, 3], [4, 1, 1, 1], [1, 2, 3, 4])
    second = dataclasses.replace(second, prompts=_prompts([2, 3], lengths=[5, 2]))
    both = RolloutBatch.concat([first, second], PAD)
    assert _rows(both) == [1, 2, 3]
    # Prompts: left-padded to 5 tokens; responses: right-padded to 4 with PAD and mask 0.
    assert both.prompts.input_ids.tolist() == [
        [PAD, PAD, 101, 101, 101],
        [102, 102, 102, 102, 102],
        [PAD, PAD, PAD, 103, 103],
    ]
    assert both.prompts.attention_mask.sum(1).tolist() == [3, 5, 2]
    assert both.response_ids.tolist() == [
        [10, 0, 0, 0],
        [11, 11, 0, 0],
        [20, 20, 20, 20],
        [21, 0, 0, 0],
        [30, 0, 0, 0],
        [31, 0, 0, 0],
    ]
    assert both.response_mask.sum(1).tolist() == [1, 2, 4, 1, 1, 1]
    assert both.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.rewards.tolist() == [0.5, 0.25, 1, 2, 3, 4]
    assert both.rollout_seconds == 3.0
    # The pieces come back exactly from the whole.
    for whole, part in ((both.select_groups(torch.tensor([1, 2])), second),):
        assert torch.equal(whole.response_ids, part.response_ids)
        assert torch.equal(whole.sampler_logp, part.sampler_logp)  # type: ignore[arg-type]
        assert whole.texts == part.texts


def test_concat_refuses_batches_with_and_without_views():
    with pytest.raises(ValueError, match="only some carry views"):
        RolloutBatch.concat(
            [_rollout([1], [1, 1], [0, 1]), _rollout([2], [1, 1], [0, 1], views=False)], PAD
        )


# ------------------------------------------------------------------ the pool of rounds
def test_pool_takes_the_first_informative_groups_in_generation_order():
    # target 2. Round 1: rows 10 (dropped), 11 (kept). Round 2: rows 12, 13 (both kept).
    # Kept in order: 11, 12 (13 is beyond the target); batch = [11, 12].
    pool = GroupPool(target=2, pad_token_id=PAD)
    pool.add(_rollout([10, 11], [1, 1, 2, 3], [0, 0, 0, 1]), torch.tensor([False, True]))
    assert not pool.enough and pool.kept_groups == 1
    pool.add(_rollout([12, 13], [2, 2, 1, 1], [1, 0, 0, 1]), torch.tensor([True, True]))
    assert pool.enough and pool.rounds == 2 and pool.dropped_groups == 1
    assert pool.rows == [10, 11, 12, 13]
    batch = pool.batch(pool.available)
    assert _rows(batch) == [11, 12]
    assert batch.texts == ["r11g0", "r11g1", "r12g0", "r12g1"]
    assert batch.response_ids.tolist() == [
        [110, 110, 0],
        [111, 111, 111],
        [120, 120, 0],
        [121, 121, 0],
    ]
    assert batch.rewards.tolist() == [0, 1, 1, 0]
    assert batch.rollout_seconds == 3.0  # both rounds, the dropped groups' time included


def test_pool_fills_a_batch_the_rounds_could_not_with_the_first_dropped_groups():
    # target 3, two rounds (the cap): kept 11 and 13; dropped 10, 12. Batch: 11, 13, then 10.
    pool = GroupPool(target=3, pad_token_id=PAD)
    pool.add(_rollout([10, 11], [1, 1, 1, 1], [0, 0, 0, 1]), torch.tensor([False, True]))
    pool.add(_rollout([12, 13], [1, 1, 1, 1], [1, 1, 0, 1]), torch.tensor([False, True]))
    assert not pool.enough and pool.available == 3 and pool.kept_groups == 2
    assert _rows(pool.batch(3)) == [11, 13, 10]
    # Another rank made fewer groups: every rank trims to the smallest count, kept first.
    assert _rows(pool.batch(1)) == [11]
    with pytest.raises(ValueError, match="size 4 not in"):
        pool.batch(4)


def test_pool_refuses_a_verdict_of_the_wrong_shape():
    with pytest.raises(ValueError, match="one bool per group"):
        GroupPool(2, PAD).add(_rollout([1], [1, 1], [0, 1]), torch.tensor([True, False]))


# ------------------------------------------------------------------ the callback's rounds
class _Strategy:
    """One rank of two: ``reduce`` adds (or takes the min with) the other rank's values."""

    def __init__(self, other_missing: list[float], other_available: int) -> None:
        self.other_missing = list(other_missing)  # the other rank's "not enough", by round
        self.other_available = other_available

    def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        if reduce_op == "sum":
            return value + self.other_missing.pop(0)
        assert reduce_op == "min"
        return torch.minimum(value, torch.tensor(self.other_available))


class _Scripted(RolloutCallback):
    """Each 'generation' returns the next prebuilt rollout; the filter keeps reward sums > 0."""

    def __init__(self, rollouts: list[RolloutBatch], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(group_size=G, filter=_PositiveGroups(**kwargs))
        self.rollouts = list(rollouts)
        self.prompts: list[PromptBatch] = []

    def collect(self, pl_module, batch):  # type: ignore[no-untyped-def]
        self.prompts.append(batch)
        return self.rollouts.pop(0)


class _PositiveGroups(DynamicSampling):
    def keep(self, rollout: RolloutBatch) -> torch.Tensor:
        return rollout.rewards.view(-1, G).sum(1) > 0


def _fake_fit(strategy: _Strategy, batch_size: int = 2):  # type: ignore[no-untyped-def]
    asked: list[tuple[int, int, list[int]]] = []

    def extra_prompts(step: int, round: int, exclude=()):  # type: ignore[no-untyped-def]
        asked.append((step, round, list(exclude)))
        return _prompts([90 + round])

    trainer = SimpleNamespace(
        strategy=strategy,
        global_step=6,
        datamodule=SimpleNamespace(batch_size=batch_size, extra_prompts=extra_prompts),
    )
    module = SimpleNamespace(
        device=torch.device("cpu"),
        processor=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD)),
    )
    return trainer, module, asked


def test_every_rank_takes_as_many_rounds_as_the_slowest_one():
    # This rank has 2 informative groups after round 1; the other rank is short after rounds 1
    # and 2 ("missing" 1, 1) and has enough after round 3 (0). So this rank generates 3 rounds
    # too, asks for the extra prompts of step 6, rounds 1 and 2, and keeps its first 2 groups.
    rounds = [
        _rollout([1, 2], [1, 1, 1, 1], [1, 0, 0, 1]),
        _rollout([3, 4], [1, 1, 1, 1], [1, 0, 1, 0]),
        _rollout([5, 6], [1, 1, 1, 1], [0, 0, 1, 0]),
    ]
    callback = _Scripted(rounds, max_rounds=10)
    trainer, module, asked = _fake_fit(_Strategy([1.0, 1.0, 0.0], other_available=2))
    rollout, metrics = callback.collect_filtered(trainer, module, _prompts([1, 2]))  # type: ignore[arg-type]
    assert [a[:2] for a in asked] == [(6, 1), (6, 2)]
    assert asked[1][2] == [1, 2, 3, 4]  # rows already generated this step are not drawn again
    assert _rows(rollout) == [1, 2]
    assert metrics == {
        "rollout/sampling_rounds": 3.0,
        "rollout/dropped_groups": 1.0,  # row 6
        "rollout/sampling_cap_hit": 0.0,
        "rollout/filled_groups": 0.0,
    }


def test_the_cap_ends_the_rounds_and_fills_the_batch():
    # max_rounds 2: round 1 keeps row 2, round 2 keeps nothing; the other rank has enough.
    # The cap is hit: the batch is row 2 then the first dropped group, row 1.
    rounds = [
        _rollout([1, 2], [1, 1, 1, 1], [0, 0, 1, 0]),
        _rollout([3, 4], [1, 1, 1, 1], [0, 0, 0, 0]),
    ]
    callback = _Scripted(rounds, max_rounds=2)
    trainer, module, _ = _fake_fit(_Strategy([0.0, 0.0], other_available=2))
    rollout, metrics = callback.collect_filtered(trainer, module, _prompts([1, 2]))  # type: ignore[arg-type]
    assert _rows(rollout) == [2, 1]
    assert metrics == {
        "rollout/sampling_rounds": 2.0,
        "rollout/dropped_groups": 3.0,
        "rollout/sampling_cap_hit": 1.0,
        "rollout/filled_groups": 1.0,
    }


# ------------------------------------------------------------------ the rollout's flags
def test_truncated_is_the_length_limit_without_end_of_sequence():
    # max_new_tokens 4, EOS id 2:
    #   [5, 6, 2, pad]  3 tokens, ended by EOS           -> False
    #   [5, 6, 7, 8]    4 tokens, the last is not EOS    -> True (cut)
    #   [5, 6, 7, 2]    4 tokens, EOS exactly at the limit -> False (finished)
    #   [5, pad, ...]   1 token (< limit)                -> False
    ids = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8], [5, 6, 7, 2], [5, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert truncated_responses(ids, mask, 4, [2]).tolist() == [False, True, False, False]
    # Two end-of-sequence ids: 8 is one of them, so row 1 finished too.
    assert truncated_responses(ids, mask, 4, [2, 8]).tolist() == [False, False, False, False]


class _FixedEngine:
    """An engine that returns the same responses whatever it is asked."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def sample(self, *args, **kwargs) -> Samples:  # type: ignore[no-untyped-def]
        return self.samples


def test_the_scorer_gets_token_counts_and_the_batch_its_truncation_flags(tiny_policy):
    _, processor = tiny_policy
    tokenizer = processor.tokenizer
    eos, word = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("a")
    # 1 prompt x G = 3, max_new_tokens 4: lengths 2 (EOS), 4 (cut), 4 (EOS at the limit).
    ids = torch.tensor([[word, eos, 0, 0], [word] * 4, [word, word, word, eos]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    seen: dict = {}

    def length_term(completions, **columns):  # type: ignore[no-untyped-def]
        seen.update(columns)
        return [0.0] * len(completions)

    # L_max 4, L_cache 2 (expected 2): penalties -(2 - 2)/2 = 0, -(4 - 2)/2 = -1, -1.
    scorer = WeightedReward(
        functions={"length": length_term, "overlong": OverlongPenalty(4, 2)},
        weights={"length": 1.0, "overlong": 1.0},
    )
    rollout = collect_rollouts(
        torch.nn.Module(),
        processor,
        _prompts([4], views=False),
        scorer,
        SimpleNamespace(max_new_tokens=4),  # type: ignore[arg-type]
        group_size=3,
        engine=_FixedEngine(Samples(ids, mask, mask * 0.0)),  # type: ignore[arg-type]
    )
    assert seen[RESPONSE_LENGTH] == [2, 4, 4]
    assert seen["answer"] == ["a4"] * 3
    assert rollout.truncated is not None and rollout.truncated.tolist() == [False, True, False]
    assert rollout.reward_terms["overlong"].tolist() == [0.0, -1.0, -1.0]
    assert rollout.generated_from is None


def test_a_dataset_column_named_like_the_lengths_is_refused(tiny_policy):
    _, processor = tiny_policy
    prompts = _prompts([4], views=False)
    prompts = prompts._replace(columns={RESPONSE_LENGTH: [3]})
    samples = Samples(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rename that column"):
        collect_rollouts(
            torch.nn.Module(),
            processor,
            prompts,
            WeightedReward(),
            SimpleNamespace(max_new_tokens=2),  # type: ignore[arg-type]
            group_size=2,
            engine=_FixedEngine(samples),  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------ overlong filtering
def _micro(mask: torch.Tensor, truncated: torch.Tensor | None) -> MicroBatch:
    n = mask.shape[0]
    rollout = SimpleNamespace(truncated=truncated)
    return MicroBatch(
        scores=None,  # type: ignore[arg-type]
        logp=torch.zeros(mask.shape),
        response_ids=torch.zeros(mask.shape, dtype=torch.long),
        response_mask=mask,
        advantages=torch.zeros(n),
        view_scores=None,  # type: ignore[arg-type]
        rollout=rollout,  # type: ignore[arg-type]
    )


def test_drop_truncated_zeroes_the_cut_responses_and_the_mean_skips_them():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    truncated = torch.tensor([False, True, False])
    weighting = DropTruncated()
    weight, stats = weighting(_micro(mask, truncated))
    assert weighting.normalise == "selected"
    assert weight.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    assert float(stats["truncated_fraction"]) == pytest.approx(1 / 3)
    # What the step then computes (loss mask = mask & weight, token-mean): with logp = old_logp
    # every ratio is 1 and the token loss is -A. Advantages (1, 5, -1) on 3, 4, 2 tokens:
    # dropping the cut response -> -(1 * 3 + (-1) * 2) / (3 + 2) = -0.2; without -> -21 / 9.
    logp = torch.zeros(3, 4)
    advantages = torch.tensor([1.0, 5.0, -1.0])
    kwargs = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "agg": "token-mean"}
    dropped, _ = policy_loss(logp, logp, advantages, mask.bool() & weight, **kwargs)
    kept, _ = policy_loss(logp, logp, advantages, mask, **kwargs)
    assert float(dropped) == pytest.approx(-0.2)
    assert float(kept) == pytest.approx(-21 / 9)


def test_drop_truncated_needs_the_flag():
    with pytest.raises(ValueError, match=r"needs RolloutBatch\.truncated"):
        DropTruncated()(_micro(torch.ones(1, 2), None))


# ------------------------------------------------------------------ the extra prompts
def test_extra_prompts_are_a_function_of_step_round_and_rank(tiny_model_dir):
    from cppo_lightning.data import VisionLanguageDataModule
    from cppo_lightning.data.synthetic import SyntheticShapes

    dm = VisionLanguageDataModule(
        SyntheticShapes(num_train=12, num_val=2, seed=0),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=3,
    )
    dm.setup("fit")
    state = torch.get_rng_state()

    def rows(*args, **kwargs) -> list[int]:  # type: ignore[no-untyped-def]
        batch = dm.extra_prompts(*args, **kwargs)
        assert batch.num_prompts == 3 and batch.row_index is not None
        return batch.row_index.tolist()

    first = rows(5, 1)
    assert rows(5, 1) == first  # the same draw again
    assert rows(5, 2) != first and rows(6, 1) != first
    # Rows already generated this step are left out while others remain.
    assert not set(rows(5, 1, exclude=first)) & set(first)
    assert len(set(rows(5, 1, exclude=range(10)))) == 3  # 2 fresh rows, then the first excluded
    assert set(rows(5, 1, exclude=range(10))) >= {10, 11}
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is untouched
