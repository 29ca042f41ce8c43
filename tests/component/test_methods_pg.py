"""GSPO, high-entropy tokens and VPPO through the real step, on the embedded model.

The unit tests check each component alone; these check that the step really calls it at its
seam and uses what it returns: the loss of ``module.update.compute_loss`` (and its gradient on
every trainable parameter) equals a loss assembled here by hand from forwards made independently
of the module's wiring (``module.update.score`` under explicitly chosen image tensors), and
differs from what the step would compute without the component.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cppo_lightning.losses.token_selection import top_entropy_mask
from cppo_lightning.losses.vppo import vppo_token_mask
from cppo_lightning.methods import (
    DependencyShaping,
    DependentTokens,
    EntropyPenalty,
    HighEntropyTokens,
    SequenceRatio,
)
from cppo_lightning.module import CPPOModule
from cppo_lightning.perturbations import PatchMask
from cppo_lightning.records import RolloutBatch
from cppo_lightning.rollout import Sampling
from tests.component.test_views import _datamodule, _first_batch

MODEL = "builtin:tiny-qwen2.5-vl"


def _module(**components) -> CPPOModule:  # type: ignore[no-untyped-def]
    module = CPPOModule(MODEL, group_size=4, kl_coef=0.0, **components)
    module.configure_model()
    return module


def _rollout(module: CPPOModule, removing=None) -> RolloutBatch:  # type: ignore[no-untyped-def]
    """4 prompts x 4 responses of up to 12 tokens, prepared for the update, advantages
    alternating +1 / -1 in every group."""
    dm = _datamodule(MODEL, None, removing)
    torch.manual_seed(0)
    rollout = module.update.prepare_update(
        module.collect_rollout(_first_batch(dm), Sampling(12, 1.0))
    )
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(rollout.num_responses)])
    return dataclasses.replace(rollout, advantages=signs)


def _all(rollout: RolloutBatch) -> torch.Tensor:
    return torch.arange(rollout.num_responses)


def _grads(module: CPPOModule, loss: torch.Tensor) -> list[torch.Tensor | None]:
    params = list(module.trainable_parameters())
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def _assert_same_gradient(module: CPPOModule, loss, expected) -> None:  # type: ignore[no-untyped-def]
    got, want = _grads(module, loss), _grads(module, expected)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in got)
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            assert g is None and w is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def _differs(module: CPPOModule, loss, other) -> bool:  # type: ignore[no-untyped-def]
    got, alt = _grads(module, loss), _grads(module, other)
    return any(
        g is not None and a is not None and not torch.allclose(g, a, rtol=1e-3, atol=1e-6)
        for g, a in zip(got, alt, strict=True)
    )


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def test_high_entropy_tokens_carry_the_whole_policy_loss():
    """loss = token mean over the selected tokens of -A * ratio (ratio 1 with value, gradient
    d ratio / d logp = 1): the unselected tokens contribute neither value nor gradient."""
    module = _module(token_weighting=HighEntropyTokens(rho=0.2))
    rollout = _rollout(module)
    loss, stats, _ = module.update.compute_loss(rollout, _all(rollout))
    mask = rollout.response_mask.bool()
    logp, entropy = module.update.score(module.policy, rollout, _all(rollout)).logps_and_entropy()
    selected = top_entropy_mask(entropy, mask, 0.2)  # [N, L]
    assert 0 < selected.sum() < mask.sum()
    per_token = -rollout.advantages[:, None] * torch.exp(logp - logp.detach())  # [N, L]
    expected = _token_mean(per_token, selected)  # normalise="selected": over the selected only
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    _assert_same_gradient(module, loss, expected)
    assert _differs(module, loss, _token_mean(per_token, mask))  # plain GRPO's loss
    assert float(stats["train/tokens/fraction"]) == pytest.approx(
        float(selected.sum() / mask.sum())
    )
    assert float(stats["train/tokens/threshold"]) == pytest.approx(
        float(entropy[selected].min()), rel=1e-5
    )


def test_gspo_clips_whole_responses_in_the_step():
    """With old log-probs shifted by c_i per response, s_i = e^{c_i}; the loss is the
    seq-mean of max(-A s, -A clip(s, 1 - 3e-4, 1 + 4e-4)) written out here, and exactly the
    responses moved out of the range in the direction of their advantage are clipped."""
    module = _module(policy_loss=SequenceRatio(), loss_agg="seq-mean-token-mean")
    rollout = _rollout(module)
    mask = rollout.response_mask
    n = rollout.num_responses
    shift = torch.tensor([(0.0, 1e-2, -1e-2)[i % 3] for i in range(n)])  # c_i
    advantages = torch.tensor([(1.0, -1.0)[(i // 3) % 2] for i in range(n)])
    with torch.no_grad():
        current = module.update.sequence_logps(module.policy, rollout, _all(rollout))
    rollout = dataclasses.replace(rollout, old_logp=current - shift[:, None], advantages=advantages)
    loss, stats, _ = module.update.compute_loss(rollout, _all(rollout))

    logp = module.update.score(module.policy, rollout, _all(rollout)).logps()
    log_s = ((logp - rollout.old_logp) * mask).sum(1) / mask.sum(1)  # [N], = c_i in value
    s = torch.exp(log_s)
    per_response = torch.maximum(-advantages * s, -advantages * s.clamp(1 - 3e-4, 1 + 4e-4))
    expected = per_response.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    _assert_same_gradient(module, loss, expected)
    clipped = ((shift > 0) & (advantages > 0)) | ((shift < 0) & (advantages < 0))
    assert float(stats["train/seq_clip_frac"]) == pytest.approx(float(clipped.float().mean()))
    assert float(stats["train/ratio_max"]) == pytest.approx(float(torch.exp(torch.tensor(1e-2))))


def test_vppo_reads_the_masked_image_shapes_the_advantages_and_filters_tokens():
    """prepare_update computes old_logp under the original image and removed_logp under the
    removing view; the advantage seam scales each response by its mean dependency (the most
    dependent response up); the loss is the token mean of -A' * ratio on the top 40% most
    dependent tokens of each response, over every valid token, + 0.06 * mean(-logp)."""
    module = _module(
        advantage=DependencyShaping(),
        token_weighting=DependentTokens(),
        extra_losses=[EntropyPenalty()],
        clip_high=0.28,
    )
    rollout = _rollout(module, removing=PatchMask(mask_prob=1.0))
    mask = rollout.response_mask.bool()
    views = rollout.prompts.views
    assert views is not None and rollout.old_logp is not None and rollout.removed_logp is not None
    with torch.no_grad():  # independent forwards, under explicitly chosen image tensors
        original = module.update.score(module.policy, rollout, _all(rollout)).logps()
        masked = module.update.score(
            module.policy, rollout, _all(rollout), views.vision_neg
        ).logps()
    torch.testing.assert_close(rollout.old_logp[mask], original[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.removed_logp[mask], masked[mask], rtol=1e-5, atol=1e-6)
    assert (original - masked)[mask].abs().max() > 1e-2  # the blacked-out image matters

    # The dependency and the advantage scale, written out (scale_min 0.9).
    d = (masked - original).clamp(-20, 20)
    dependency = (torch.exp(d) - d - 1).clamp(0, 10)  # [N, L]
    score = (dependency * mask).sum(1) / mask.sum(1)  # [N]
    u = (score - score.min()) / (score.max() - score.min())
    top = 0.9 + 0.1 / (u.mean() + 1e-8)
    scale = 0.9 + u * (top - 0.9)
    sums: dict[str, float] = {}
    shaped = module.update._transform_advantages(rollout, _all(rollout), sums)
    assert shaped.advantages is not None
    torch.testing.assert_close(shaped.advantages, rollout.advantages * scale, rtol=1e-4, atol=1e-6)
    most = int(score.argmax())
    assert shaped.advantages[most].abs() == shaped.advantages.abs().max() > 1.0
    assert sums["train/advantage/scale_max"] == pytest.approx(float(top), rel=1e-4)

    loss, stats, _ = module.update.compute_loss(shaped, _all(shaped))
    logp = module.update.score(module.policy, shaped, _all(shaped)).logps()
    selected = vppo_token_mask(dependency, mask, 0.4)
    ratio = torch.exp(logp - shaped.old_logp)  # 1 in value: no clip is active
    assert float(stats["train/clip_frac"]) == 0.0
    policy = _token_mean(-shaped.advantages[:, None] * ratio * selected, mask)  # over all valid
    expected = policy + 0.06 * _token_mean(-logp, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    _assert_same_gradient(module, loss, expected)
    assert _differs(module, loss, _token_mean(-shaped.advantages[:, None] * ratio, mask))
    assert float(stats["train/tokens/fraction"]) == pytest.approx(
        float(selected.sum() / mask.sum())
    )
    assert float(stats["train/entropy/estimate"]) == pytest.approx(
        float(_token_mean(-logp.detach(), mask)), rel=1e-5
    )
