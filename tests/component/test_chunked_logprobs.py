"""The chunked log-prob path equals the full-logits one, in values and gradients, and keeps no
``[n, L, V]`` tensor for the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.detection import token_entropy
from cppo_lightning.logprobs import (
    DEFAULT_LOGIT_BUDGET,
    Scoring,
    chunk_positions,
    head_scores,
    score_responses,
)
from cppo_lightning.policy import (
    LoraSettings,
    apply_lora,
    response_logits,
    suppressed_token_ids,
    token_logps,
)


def _batch(processor, rows, n_per_prompt=2, length=9, seed=0):  # type: ignore[no-untyped-def]
    prompts = PromptCollator(processor, "Answer.")(rows)
    index = torch.arange(prompts.num_prompts).repeat_interleave(n_per_prompt)
    suppressed = set(suppressed_token_ids(processor))
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in suppressed])
    generator = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (len(index), length), generator=generator)]
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a padded response
    return prompts, index, ids, mask


def _old_logps(model, prompts, index, ids, mask, scoring):  # type: ignore[no-untyped-def]
    """The path before this module: full logits, suppressed ids masked, gather - logsumexp."""
    logits = response_logits(model, prompts, index, ids, mask)  # [n, L, V]
    logits = logits.index_fill(-1, torch.tensor(scoring.suppressed_ids), float("-inf"))
    return token_logps(logits, ids, scoring.temperature), logits


def _grads(model, value):  # type: ignore[no-untyped-def]
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
def test_float64_values_and_gradients_equal_the_full_logits_path(tiny_policy, shapes_rows, chunk):
    model, processor = tiny_policy
    model = copy.deepcopy(model).double().train(False)
    prompts, index, ids, mask = _batch(processor, shapes_rows[:3])
    scoring = Scoring(0.7, tuple(suppressed_token_ids(processor)), chunk)
    weights = torch.rand(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    old, old_logits = _old_logps(model, prompts, index, ids, mask, scoring)
    old_entropy = token_entropy(old_logits, scoring.temperature)
    old_value = (old * weights * mask).sum() + (old_entropy * mask).sum()
    expected = _grads(model, old_value)

    scores = score_responses(model, prompts, index, ids, mask, scoring)
    logp, entropy = scores.logps_and_entropy(entropy_grad=True)
    assert logp.dtype == torch.float64 and logp.shape == ids.shape
    value = (logp * weights * mask).sum() + (entropy * mask).sum()
    actual = _grads(model, value)

    valid = mask.bool()
    torch.testing.assert_close(logp[valid], old[valid], rtol=0, atol=1e-10)
    torch.testing.assert_close(entropy[valid], old_entropy[valid], rtol=0, atol=1e-10)
    checked = 0
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
        checked += 1
    assert checked > 10  # the head, the text layers and the vision tower all get gradients


def test_float32_matches_and_no_graph_without_gradients(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    prompts, index, ids, mask = _batch(processor, shapes_rows[:4], seed=2)
    scoring = Scoring(1.0, tuple(suppressed_token_ids(processor)), 7)
    with torch.no_grad():
        old, _ = _old_logps(model, prompts, index, ids, mask, scoring)
        scores = score_responses(model, prompts, index, ids, mask, scoring)
        logp = scores.logps()
        entropy = scores.entropy()
    assert logp.dtype == torch.float32 and not logp.requires_grad and not entropy.requires_grad
    valid = mask.bool()
    torch.testing.assert_close(logp[valid], old[valid], rtol=0, atol=1e-5)
    # Suppressed ids carry no probability: the distribution sums to 1 over the rest.
    dist = scores.log_distribution(valid)
    assert torch.isinf(dist[:, list(scoring.suppressed_ids)]).all()
    torch.testing.assert_close(dist.exp().sum(-1), torch.ones(len(dist)), rtol=0, atol=1e-5)


def test_selected_distributions_are_exact(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    prompts, index, ids, mask = _batch(processor, shapes_rows[:2], seed=4)
    scoring = Scoring(0.5, tuple(suppressed_token_ids(processor)), 3)
    selected = torch.zeros_like(mask, dtype=torch.bool)
    selected[1, 2] = selected[2, 5] = selected[3, 0] = True
    with torch.no_grad():
        _, logits = _old_logps(model, prompts, index, ids, mask, scoring)
        expected = torch.log_softmax(logits[selected] / scoring.temperature, -1)
        actual = score_responses(model, prompts, index, ids, mask, scoring).log_distribution(
            selected
        )
    assert actual.shape == (3, logits.shape[-1])
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual))
    torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=1e-5)


def test_lora_adapters_on_and_off(tiny_policy, shapes_rows):
    model, processor = tiny_policy
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8))
    # Non-zero adapters, so that "on" and "off" differ.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts, index, ids, mask = _batch(processor, shapes_rows[:2], seed=5)
    scoring = Scoring(1.0, tuple(suppressed_token_ids(processor)), 4)
    valid = mask.bool()
    with torch.no_grad():
        on_old, _ = _old_logps(peft_model, prompts, index, ids, mask, scoring)
        on_new = score_responses(peft_model, prompts, index, ids, mask, scoring).logps()
        with peft_model.disable_adapter():
            off_new = score_responses(peft_model, prompts, index, ids, mask, scoring).logps()
        base, _ = _old_logps(model, prompts, index, ids, mask, scoring)
    torch.testing.assert_close(on_new[valid], on_old[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(off_new[valid], base[valid], rtol=0, atol=1e-5)
    assert (on_new - off_new)[valid].abs().max() > 1e-3


def test_backward_keeps_no_vocabulary_sized_tensor():
    """Outside each chunk's checkpoint nothing ``[*, V]`` is saved for the backward; without
    chunks the ``[n * L, V]`` logits are (the old path's memory)."""
    torch.manual_seed(0)
    n, length, size, vocab = 3, 40, 16, 5000
    head = torch.nn.Linear(size, vocab, bias=False)
    ids = torch.randint(vocab, (n, length))

    def largest_saved(chunk: int) -> int:
        hidden = torch.randn(n, length, size, requires_grad=True)
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = head_scores(head, hidden, ids, Scoring(1.0, (), chunk), entropy="grad")
        logp.sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0
        return max(sizes, default=0)

    assert largest_saved(8) < vocab  # nothing of vocabulary size kept between forward and backward
    assert largest_saved(n * length) >= n * length * vocab


def test_chunked_gradients_equal_unchunked_on_a_plain_head():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 300, bias=False).double()
    hidden = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(300, (2, 11))
    results = []
    for chunk in (22, 3):
        logp, entropy = head_scores(head, hidden, ids, Scoring(0.9, (7, 9), chunk), entropy="grad")
        grads = torch.autograd.grad((logp + 0.3 * entropy).sum(), [hidden, head.weight])
        results.append((logp, entropy, grads))
    (l1, e1, g1), (l2, e2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-12)
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_chunk_sizes_and_settings_errors():
    assert chunk_positions(151_936) == DEFAULT_LOGIT_BUDGET // 151_936 == 441
    assert chunk_positions(512) == DEFAULT_LOGIT_BUDGET // 512
    assert chunk_positions(151_936, 64) == 64
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="logprob_chunk_tokens"):
            Scoring(1.0, (), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        Scoring(0.0)
    with pytest.raises(ValueError, match="entropy"):
        head_scores(
            torch.nn.Linear(2, 3),
            torch.zeros(1, 1, 2),
            torch.zeros(1, 1).long(),
            Scoring(),
            entropy="x",
        )


def test_module_rejects_a_bad_chunk_size_before_loading():
    from cppo_lightning.module import CPPOModule

    with pytest.raises(ValueError, match="logprob_chunk_tokens"):
        CPPOModule(logprob_chunk_tokens=0)
