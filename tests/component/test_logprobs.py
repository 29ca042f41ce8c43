"""The teacher-forced forward must reproduce the log-probs ``generate`` sampled with."""

from __future__ import annotations

import torch

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.policy import response_logits, suppressed_token_ids, token_logps
from cppo_lightning.rollout import Sampling, generate_responses, response_mask_from_ids


def test_forward_logps_match_generate(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    # Questions of different lengths -> left padding inside the prompt batch.
    prompts = PromptCollator(processor, "Answer.")(shapes_rows[:4])
    assert (prompts.attention_mask == 0).any(), "the batch should exercise left padding"
    torch.manual_seed(0)
    inputs = {
        "input_ids": prompts.input_ids,
        "attention_mask": prompts.attention_mask,
        **prompts.vision,
        "mm_token_type_ids": prompts.mm_token_type_ids,
    }
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=12,
        num_return_sequences=2,
        suppress_tokens=suppressed_token_ids(processor),
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    response_ids = out.sequences[:, prompts.input_ids.shape[1] :]
    mask = response_mask_from_ids(response_ids, [processor.tokenizer.eos_token_id])
    # generate's raw logits (before suppression) give the sampler's distribution over the vocab.
    gen_logits = torch.stack(out.logits, dim=1)  # [N, L, V]
    suppressed = suppressed_token_ids(processor)
    gen_logits[..., suppressed] = float("-inf")
    expected = token_logps(gen_logits, response_ids)
    index = torch.arange(4).repeat_interleave(2)
    logits = response_logits(model, prompts, index, response_ids, mask)
    logits[..., suppressed] = float("-inf")
    actual = token_logps(logits, response_ids)
    valid = mask.bool()
    assert valid.sum() > 8
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_generate_suppresses_vision_tokens(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    prompts = PromptCollator(processor, "Answer.")(shapes_rows[:2])
    ids, mask = generate_responses(
        model,
        processor,
        prompts,
        Sampling(max_new_tokens=16, temperature=1.5),
        num_samples=4,
        suppress_token_ids=suppressed_token_ids(processor),
    )
    assert ids.shape[0] == 8 and mask.shape == ids.shape
    assert not torch.isin(ids, torch.tensor(suppressed_token_ids(processor))).any()


def test_generating_in_chunks_gives_the_same_greedy_responses(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    prompts = PromptCollator(processor, "Answer.")(shapes_rows[:5])
    whole = generate_responses(
        model, processor, prompts, Sampling(max_new_tokens=12, temperature=0.0), num_samples=1
    )
    chunked = generate_responses(
        model,
        processor,
        prompts,
        Sampling(max_new_tokens=12, temperature=0.0, batch_size=2),  # 2 prompts per call
        num_samples=1,
    )
    assert torch.equal(whole[1], chunked[1])
    assert torch.equal(whole[0][whole[1].bool()], chunked[0][chunked[1].bool()])
