"""The directions the module wires, pinned end to end on the tiny policy.

The unit tests check each loss function alone; these check that the module hands them the right
views, the right roles and the right signs: a swap of the two views, of D+ and D-, of H and H-,
of the advantage gate or of PAPO's sign fails here. Every measurement the assertions use is made
independently of the module's wiring: forwards under explicitly chosen image tensors
(``views.vision_pos`` / ``views.vision_neg``), never through the names the module maps.

The set-up makes the expected direction unambiguous: the embedded model (which looks), I+ the
identity (so ``D+`` is exactly 0 for every parameter value) and I- blacking out the whole image.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cppo_lightning.detection import TokenSelector, perception_token_mask
from cppo_lightning.losses import kl_estimate
from cppo_lightning.module import CPPOModule
from cppo_lightning.perception import ContrastivePerception, ImplicitPerception
from cppo_lightning.perturbations import PatchMask
from cppo_lightning.records import RolloutBatch
from cppo_lightning.rollout import Sampling
from tests.component.test_views import Identity, _datamodule, _first_batch

TOP_FRACTION = 0.5
#: The embedded model looks at its image (a random tiny one barely does: D- ~ 1e-5).
MODEL = "builtin:tiny-qwen2.5-vl"


def _module(model_dir, objective, **selector) -> CPPOModule:  # type: ignore[no-untyped-def]
    module = CPPOModule(str(model_dir), perception_loss=objective, group_size=4, kl_coef=0.0)
    module.configure_model()
    if objective.selects_tokens:
        module.set_token_selector(TokenSelector(top_fraction=TOP_FRACTION, score="raw", **selector))
        module.set_cpl_weight(1.0)
    return module


def _rollout(module: CPPOModule, model_dir, advantages: str = "ones") -> RolloutBatch:  # type: ignore[no-untyped-def]
    dm = _datamodule(model_dir, Identity(), PatchMask(mask_prob=1.0))
    torch.manual_seed(0)
    rollout = module.update.prepare_update(
        module.collect_rollout(_first_batch(dm), Sampling(12, 1.0))
    )
    n = rollout.num_responses
    if advantages == "ones":  # every response positive: the gate keeps all of them
        values = torch.ones(n)
    else:  # alternate +1 / -1 inside every group
        values = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(n)])
    return dataclasses.replace(rollout, advantages=values)


def _scores(module: CPPOModule, rollout: RolloutBatch, vision):  # type: ignore[no-untyped-def]
    """Log-probs and entropies of every response under ``vision`` (None: the original image)."""
    index = torch.arange(rollout.num_responses)
    return module.update.score(module.policy, rollout, index, vision).logps_and_entropy()


def _mean_k3(module: CPPOModule, rollout: RolloutBatch, vision, mask) -> float:  # type: ignore[no-untyped-def]
    """Mean over ``mask`` of the k3 estimate of KL(pi(.|I) || pi(.|vision)), no grad."""
    with torch.no_grad():
        logp, _ = _scores(module, rollout, None)
        logp_view, _ = _scores(module, rollout, vision)
        return float(kl_estimate(logp, logp_view)[mask.bool()].mean())


def _descend(module: CPPOModule, loss: torch.Tensor, size: float = 1e-2) -> None:
    """One plain gradient step on ``loss`` of fixed length ``size`` (first-order small)."""
    params = [p for p in module.trainable_parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
    assert norm > 0, "the loss has no gradient"
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= size * g / norm


def test_the_cpl_gets_the_preserving_view_as_positive_and_the_removing_one_as_negative():
    """With I+ = I, D+ is exactly 0 and D- is not: a swap of the views (or of D+ and D-) where
    the module feeds the loss would report D+ > 0, or select nothing (detection on I+)."""
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False)
    rollout = _rollout(module, MODEL)
    views = rollout.prompts.views
    assert torch.equal(views.vision_pos["pixel_values"], rollout.prompts.vision["pixel_values"])
    _, stats, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    assert stats["perception/selected_tokens"] > 0
    assert float(stats["perception/d_pos"]) == 0.0
    expected = _mean_k3(module, rollout, views.vision_neg, term.mask)
    assert float(stats["perception/d_neg"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 1e-3
    assert float(stats["perception/contrast_accuracy"]) > 0.9  # D+ = 0 < D- almost everywhere


def test_a_cpl_step_raises_the_divergence_to_the_removing_view():
    """A small step down the CPL's gradient (policy loss 0: zero advantages, no gate) raises
    D- = KL(pi(.|I) || pi(.|I-)) at the selected tokens, measured by forwards under
    ``vision_neg`` itself; D+ stays exactly 0 (I+ = I whatever the weights)."""
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False)
    rollout = _rollout(module, MODEL)
    rollout = dataclasses.replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    loss, stats, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    assert float(stats["train/policy_loss"]) == 0.0 and term.mask.any()
    views, selected = rollout.prompts.views, term.mask.bool()
    before = _mean_k3(module, rollout, views.vision_neg, selected)
    _descend(module, loss)
    assert _mean_k3(module, rollout, views.vision_neg, selected) > before
    assert _mean_k3(module, rollout, views.vision_pos, selected) == 0.0


def test_the_cpl_gradient_pushes_the_removing_views_log_probs_away(monkeypatch):
    """At every selected token the CPL's gradient moves the removing view's log-prob of the
    sampled token away from the original's (down where it is below it, the usual case) and
    leaves the preserving view's alone (d D+ / d logp+ = exp(0) - 1 = 0 at I+ = I).

    Read off exactly by the chain rule: each view's forward is recorded, and the gradient of the
    loss w.r.t. its hidden states is projected on the gradient of each token's log-prob w.r.t.
    the same hidden state (a token's log-prob depends on its own position's hidden state only),
    which gives dL/dlogp_view times a positive factor."""
    from cppo_lightning import perception
    from cppo_lightning.logprobs import head_scores

    forwards = []
    score_responses = perception.score_responses

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        scores = score_responses(*args, **kwargs)
        forwards.append((kwargs["vision"], scores))
        return scores

    monkeypatch.setattr(perception, "score_responses", recording)
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False)
    rollout = _rollout(module, MODEL)
    rollout = dataclasses.replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    loss, _, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    views, selected = rollout.prompts.views, term.mask.bool()

    def push(vision):  # type: ignore[no-untyped-def]
        """(log-probs, sign-exact dL/dlogp) of the one recorded forward under ``vision``."""
        (scores,) = [s for v, s in forwards if v["pixel_values"] is vision["pixel_values"]]
        (grad_hidden,) = torch.autograd.grad(loss, scores.hidden, retain_graph=True)
        hidden = scores.hidden.detach().requires_grad_()
        logp = head_scores(scores.head, hidden, scores.response_ids, scores.scoring)[0]
        (grad_logp,) = torch.autograd.grad(logp.sum(), hidden)
        return logp.detach(), (grad_hidden * grad_logp).sum(-1)  # [n, L] each

    with torch.no_grad():
        logp = _scores(module, rollout, None)[0]  # [n, L]
    logp_neg, pull_neg = push(views.vision_neg)
    _, pull_pos = push(views.vision_pos)
    gap = (logp - logp_neg)[selected]  # > 0 where I- lowers the sampled token
    assert (gap > 0).float().mean() > 0.5
    decided = gap.abs() > 1e-6
    # Descent moves logp- by -dL/dlogp-: down where gap > 0, up where gap < 0.
    assert torch.equal(torch.sign(pull_neg[selected])[decided], torch.sign(gap)[decided])
    assert (pull_pos[selected] == 0).all()


@pytest.mark.parametrize("policy", ["update", "rollout"])
def test_detection_ranks_the_entropy_rise_under_the_removing_view(policy):
    """The selected tokens are the top ``H(I-) - H(I)`` per response, H and H- computed here
    under ``vision_neg`` and the original image; ranking by ``H(I) - H(I-)`` gives another mask."""
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False)
    rollout = _rollout(module, MODEL)
    if policy == "rollout":
        rollout = module.update.detect_perception_tokens(rollout)
    _, _, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    with torch.no_grad():
        entropy = _scores(module, rollout, None)[1]
        entropy_neg = _scores(module, rollout, rollout.prompts.views.vision_neg)[1]
    mask = rollout.response_mask

    def select(h, h_neg):  # type: ignore[no-untyped-def]
        return perception_token_mask(h, h_neg, mask, top_fraction=TOP_FRACTION, score="raw")

    right, reversed_ = select(entropy, entropy_neg), select(entropy_neg, entropy)
    assert right.any() and not torch.equal(right, reversed_)
    assert torch.equal(term.mask, right)
    assert ((entropy_neg - entropy)[term.mask] > 0).all()


@pytest.mark.parametrize("policy", ["update", "rollout"])
def test_the_advantage_gate_keeps_positive_advantage_responses(policy):
    """With advantages +1 / -1 alternating, the CPL's tokens lie in the +1 responses only, and
    every +1 response that has a candidate token keeps some."""
    module = _module(MODEL, ContrastivePerception(), gate_advantages=True)
    rollout = _rollout(module, MODEL, advantages="alternate")
    if policy == "rollout":
        rollout = module.update.detect_perception_tokens(rollout)
    _, stats, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    positive = rollout.advantages > 0
    assert float(stats["perception/gated_fraction"]) == pytest.approx(0.5)
    assert not term.mask[~positive].any()
    assert term.mask[positive].any(dim=1).sum() >= positive.sum() - 1


def test_papo_pushes_the_masked_view_away():
    """PAPO's implicit perception loss alone (entropy terms off, zero advantages) maximises
    KL(pi(.|I) || pi(.|I_mask)): a small step down its gradient raises the KL measured under
    the masked image tensors themselves. A sign error would lower it."""
    objective = ImplicitPerception(gamma=1.0, entropy_coef=0.0, masked_entropy_coef=0.0)
    module = _module(MODEL, objective)
    rollout = _rollout(module, MODEL)
    rollout = dataclasses.replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    loss, stats, _ = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    vision_masked = rollout.prompts.views.vision_neg
    mask = rollout.response_mask
    before = _mean_k3(module, rollout, vision_masked, mask)
    assert float(stats["perception/kl_prcp"]) == pytest.approx(before, rel=1e-4, abs=1e-6)
    _descend(module, loss)
    assert _mean_k3(module, rollout, vision_masked, mask) > before
