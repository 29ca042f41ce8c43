"""Padding waste and update time: fixed micro-batches vs ``model.micro_batch_tokens``.

    python benchmarks/micro_batching.py

Two parts, both on rollouts whose response lengths vary widely:

1. Synthetic length distribution (arithmetic only): N = 512 responses with lengths drawn
   log-uniformly from 50 to 4,096 tokens (the shape of long-CoT rollouts), a 600-token prompt.
   Padded tokens per optimizer step for (a) fixed micro-batches of 8 padded to the longest
   response of the whole rollout batch (this project before ``RolloutBatch.take``), (b) fixed
   micro-batches of 8 cut to their own longest (now), (c) a token budget of 8 x (600 + 1,024)
   tokens (sorted packing).
2. The embedded model: 64 responses of random tokens cut to lengths drawn log-uniformly from 4
   to 256, one mini-batch, GRPO with the KL term, float32 on CPU. Median wall-clock of the
   forward and backward of the whole mini-batch (``accumulate_gradients``) over 3 repeats after
   one warm-up, fixed ``micro_batch_size: 8`` vs ``micro_batch_tokens`` at the same mean
   number of responses per micro-batch, interleaved in one run, and the padded tokens of each.

Nothing here is asserted by tests; figures go into docs/results.md.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from cppo_lightning.batching import pack_by_tokens
from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.data.synthetic import build_dataset
from cppo_lightning.module import CPPOModule
from cppo_lightning.records import RolloutBatch


def log_uniform(n: int, low: int, high: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=generator)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).round().long()


def padded(lengths: torch.Tensor, micros: list[torch.Tensor], prompt: int, cut: bool) -> int:
    longest = int(lengths.max())
    return sum(len(m) * (prompt + (int(lengths[m].max()) if cut else longest)) for m in micros)


def synthetic() -> None:
    lengths = log_uniform(512, 50, 4096, seed=0)
    prompt = 600
    real = int(lengths.sum()) + prompt * len(lengths)
    fixed = list(torch.arange(len(lengths)).split(8))
    budget = 8 * (prompt + 1024)
    packed = pack_by_tokens(lengths, prompt, budget)
    rows = [
        ("fixed 8, padded to the batch's longest (before)", fixed, False),
        ("fixed 8, cut to each micro-batch's longest", fixed, True),
        (f"micro_batch_tokens {budget}", packed, True),
    ]
    print(f"synthetic: N = 512, lengths {int(lengths.min())}-{int(lengths.max())} "
          f"(median {int(lengths.median())}), prompt {prompt}; real tokens {real:,}")  # fmt: skip
    print("| micro-batches | count | padded tokens | padding share |")
    print("|---|---:|---:|---:|")
    for name, micros, cut in rows:
        total = padded(lengths, micros, prompt, cut)
        print(f"| {name} | {len(micros)} | {total:,} | {1 - real / total:.0%} |")


def embedded() -> None:
    torch.set_num_threads(2)
    module = CPPOModule(group_size=8, max_new_tokens=256, kl_coef=0.01, micro_batch_size=8)
    module.configure_model()
    module.policy.train()
    dataset = build_dataset(8, seed=0)
    prompts = PromptCollator(module.processor, "Answer.")([dataset[i] for i in range(8)])
    n, length = 64, 256
    lengths = log_uniform(n, 4, length, seed=1)
    generator = torch.Generator().manual_seed(2)
    vocab = module.policy.config.text_config.vocab_size
    suppressed = torch.tensor(module.suppress_token_ids)
    ids = torch.randint(vocab, (n, length), generator=generator)
    ids = torch.where(torch.isin(ids, suppressed), torch.zeros_like(ids), ids)
    mask = (torch.arange(length) < lengths[:, None]).long()
    rollout = RolloutBatch(
        prompts=prompts,
        prompt_index=torch.arange(8).repeat_interleave(8),
        response_ids=ids.masked_fill(mask == 0, module.processor.tokenizer.pad_token_id),
        response_mask=mask,
        texts=[""] * n,
        rewards=torch.rand(n, generator=generator),
        reward_terms={},
        group_size=8,
    )
    rollout = module.update.prepare_update(rollout)
    prompt = prompts.input_ids.shape[1]
    index = torch.arange(n)
    fixed_micros = module.update._micro_batches(rollout, index)
    # The budget that gives the same number of micro-batches (8 responses each on average).
    budget = 8 * (prompt + int(lengths.float().mean()))
    while len(pack_by_tokens(lengths, prompt, budget)) > len(fixed_micros):
        budget += 16
    settings = {"fixed micro_batch_size 8": None, f"micro_batch_tokens {budget}": budget}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for repeat in range(4):
        for name, tokens in settings.items():
            module.micro_batch_tokens = tokens
            module.policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            module.update.accumulate_gradients(rollout, index, {}, [])
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    real = int(lengths.sum()) + prompt * n
    print(f"\nembedded model: 64 responses, lengths {int(lengths.min())}-{int(lengths.max())} "
          f"(median {int(lengths.median())}), prompt {prompt}; real tokens {real:,}")  # fmt: skip
    print("| micro-batches | count | padded tokens | padding share | update s (median of 3) |")
    print("|---|---:|---:|---:|---:|")
    untrimmed = padded(lengths, fixed_micros, prompt, cut=False)
    print(f"| fixed 8, padded to the batch's longest (before) | {len(fixed_micros)} | "
          f"{untrimmed:,} | {1 - real / untrimmed:.0%} | not run |")  # fmt: skip
    for name, tokens in settings.items():
        module.micro_batch_tokens = tokens
        micros = module.update._micro_batches(rollout, index)
        total = sum(int(rollout.take(m).response_mask.numel()) + prompt * len(m) for m in micros)
        print(f"| {name} | {len(micros)} | {total:,} | {1 - real / total:.0%} | "
              f"{statistics.median(times[name]):.2f} |")  # fmt: skip
    fixed_time = statistics.median(times["fixed micro_batch_size 8"])
    packed_time = statistics.median(times[f"micro_batch_tokens {budget}"])
    print(f"fixed / token-budget update time: {fixed_time / packed_time:.2f}x")


if __name__ == "__main__":
    synthetic()
    embedded()
