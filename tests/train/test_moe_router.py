"""Router: top-k gates, noise, load-balance / z-loss against hand computations, routing entropies."""

import math

import pytest
import torch

from train.moe import (
    Router,
    RouterOutput,
    expert_fractions,
    expert_usage_entropy,
    load_balance_loss,
    router_z_loss,
    routing_aux,
    token_routing_entropy,
)


def _router(dim=6, e=5, k=2, **kw) -> Router:
    torch.manual_seed(0)
    r = Router(dim, e, k, **kw)
    with torch.no_grad():
        r.proj.weight.normal_()
    return r


# ---------------------------------------------------------------------------------------- load balance
def test_load_balance_loss_equals_hand_computation():
    # 4 tokens, 3 experts, top-1. Choices: 0, 0, 1, 2 -> F = (2/4, 1/4, 1/4).
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    idx = torch.tensor([[0], [0], [1], [2]])
    p = [(0.7 + 0.5 + 0.1 + 0.2) / 4, (0.2 + 0.3 + 0.8 + 0.2) / 4, (0.1 + 0.2 + 0.1 + 0.6) / 4]
    hand = 3 * (0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2])  # M2oT Eq. 9, M = 3 experts
    assert load_balance_loss(probs, idx).item() == pytest.approx(hand, rel=1e-12)


def test_load_balance_counts_every_topk_choice():
    # 2 tokens, top-2 of 4: choices {0,1}, {0,3} -> F = (2/4, 1/4, 0, 1/4) over T*k = 4 choices.
    probs = torch.full((2, 4), 0.25, dtype=torch.float64)
    idx = torch.tensor([[0, 1], [0, 3]])
    torch.testing.assert_close(expert_fractions(idx, 4), torch.tensor([0.5, 0.25, 0.0, 0.25]))
    assert load_balance_loss(probs, idx).item() == pytest.approx(4 * 0.25 * 1.0)  # sum F = 1, P = 1/4


def test_load_balance_is_one_for_uniform_routing_and_larger_when_collapsed():
    e, t = 8, 64
    uniform = torch.full((t, e), 1 / e)
    balanced = torch.arange(t).remainder(e).unsqueeze(1)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(t, e)
    collapsed[:, 0] = 1
    assert load_balance_loss(collapsed, torch.zeros(t, 1, dtype=torch.long)).item() == pytest.approx(e)


def test_load_balance_gradient_flows_through_probabilities_only():
    torch.manual_seed(0)
    logits = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    load_balance_loss(probs, idx).backward()
    f = expert_fractions(idx, 4).double()
    ref_logits = logits.detach().clone().requires_grad_()
    (4 * (f * ref_logits.softmax(-1).mean(0)).sum()).backward()  # F as a constant
    torch.testing.assert_close(logits.grad, ref_logits.grad)


# ------------------------------------------------------------------------------------------------ z-loss
def test_z_loss_equals_hand_computation():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    lse = [math.log(4.0), math.log(sum(math.exp(v) for v in (1.0, 2.0, 3.0, 4.0)))]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-12)


def test_z_loss_and_metrics_ignore_masked_tokens():
    torch.manual_seed(1)
    r = _router()
    x = torch.randn(9, 6)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    full = routing_aux(r(x), mask)
    sub = routing_aux(r(x[mask]))
    for key in ("load_balance_loss", "z_loss", "expert_fraction", "expert_usage_entropy", "token_routing_entropy"):
        torch.testing.assert_close(full[key], sub[key], msg=key)


# --------------------------------------------------------------------------------------------- entropies
def test_entropies_uniform_is_one_and_one_hot_is_zero():
    e, t = 28, 56
    uniform_probs = torch.full((t, e), 1 / e)
    assert token_routing_entropy(uniform_probs).item() == pytest.approx(1.0)
    assert expert_usage_entropy(torch.full((e,), 1 / e)).item() == pytest.approx(1.0)
    one_hot = torch.zeros(t, e)
    one_hot[:, 3] = 1
    assert token_routing_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert expert_usage_entropy(expert_fractions(torch.full((t, 1), 3), e)).item() == pytest.approx(0.0, abs=1e-6)


def test_entropies_are_distinct_quantities():
    # Every token is certain (one-hot) but tokens spread evenly: usage entropy 1, token entropy 0.
    e, t = 4, 8
    idx = torch.arange(t).remainder(e).unsqueeze(1)
    probs = torch.nn.functional.one_hot(idx[:, 0], e).float()
    aux = routing_aux(RouterOutput(torch.zeros(t, e), probs, torch.ones(t, 1), idx))
    assert aux["expert_usage_entropy"].item() == pytest.approx(1.0)
    assert aux["token_routing_entropy"].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_matches_naive_formula():
    torch.manual_seed(2)
    probs = torch.randn(7, 5, dtype=torch.float64).softmax(-1)
    naive = sum(-sum(p * math.log(p) for p in row.tolist()) for row in probs) / 7 / math.log(5)
    assert token_routing_entropy(probs).item() == pytest.approx(naive, rel=1e-12)


def test_router_with_zero_weights_is_uniform():
    r = Router(6, 8, 2)
    with torch.no_grad():
        r.proj.weight.zero_()
    aux = routing_aux(r(torch.randn(10, 6)))
    assert aux["token_routing_entropy"].item() == pytest.approx(1.0)
    assert aux["z_loss"].item() == pytest.approx(math.log(8) ** 2)


# ------------------------------------------------------------------------------------------- top-k gates
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_renormalized_gates_sum_to_one(score_func):
    r = _router(score_func=score_func, k=3)
    out = r(torch.randn(11, 6))
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(11))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(11))
    assert out.topk_idx.shape == (11, 3) and out.topk_idx.dtype == torch.long


def test_raw_gates_are_the_selected_scores():
    r = _router(k=2, renormalize=False)
    x = torch.randn(11, 6)
    out = r(x)
    probs = (x @ r.proj.weight.t()).softmax(-1)
    ref = probs.topk(2, -1)
    torch.testing.assert_close(out.topk_weights, ref.values)
    assert torch.equal(out.topk_idx, ref.indices)
    assert bool((out.topk_weights.sum(-1) < 1).all())

    rs = _router(k=2, renormalize=False, score_func="sigmoid")
    out = rs(x)
    torch.testing.assert_close(out.topk_weights, torch.sigmoid(x @ rs.proj.weight.t()).topk(2, -1).values)


# ---------------------------------------------------------------------------------------------- noise
def test_noise_only_in_training_and_seeded():
    r = _router(noise_std=1.0)
    x = torch.randn(16, 6)
    r.eval()
    clean = r(x)
    clean_again = r(x)
    torch.testing.assert_close(clean.probs, clean_again.probs)
    torch.testing.assert_close(clean.probs, (x @ r.proj.weight.t()).softmax(-1))

    r.train()
    torch.manual_seed(123)
    noisy_a = r(x)
    torch.manual_seed(123)
    noisy_b = r(x)
    noisy_c = r(x)
    torch.testing.assert_close(noisy_a.probs, noisy_b.probs)
    assert not torch.allclose(noisy_a.probs, clean.probs)
    assert not torch.allclose(noisy_b.probs, noisy_c.probs)
    torch.testing.assert_close(noisy_a.logits, clean.logits)  # z-loss sees the clean logits

    r.generator = torch.Generator().manual_seed(7)
    a = r(x)
    r.generator = torch.Generator().manual_seed(7)
    torch.testing.assert_close(a.probs, r(x).probs)


def test_noise_has_requested_std():
    r = _router(dim=4, e=8, k=1, noise_std=0.5)
    with torch.no_grad():
        r.proj.weight.zero_()  # clean logits are zero, so the routed logits are the noise itself
    r.train()
    torch.manual_seed(0)
    out = r(torch.randn(4000, 4))
    noise = torch.log(out.probs)  # log-softmax of pure noise = noise - logsumexp(noise)
    noise = noise - noise.mean(-1, keepdim=True)  # remove the per-token shift
    assert noise.std().item() * math.sqrt(8 / 7) == pytest.approx(0.5, rel=0.03)


def test_zero_noise_in_training_equals_eval():
    r = _router(noise_std=0.0)
    x = torch.randn(5, 6)
    r.train()
    a = r(x)
    r.eval()
    torch.testing.assert_close(a.topk_weights, r(x).topk_weights)


# -------------------------------------------------------------------------------------------- bad input
def test_router_rejects_bad_config():
    with pytest.raises(ValueError):
        Router(4, 3, 4)
    with pytest.raises(ValueError):
        Router(4, 3, 0)
    with pytest.raises(ValueError):
        Router(4, 3, 1, score_func="tanh")
    with pytest.raises(ValueError):
        Router(4, 3, 1, noise_std=-1.0)
