"""Sparse upcycling, Soft MoE and expert-choice layers against naive float64 references."""

import pytest
import torch
import torch.nn as nn

from train.moe import (
    ExpertChoiceMLP,
    MoEMLP,
    SoftMoEMLP,
    expert_capacity,
    slots_for_topk,
    upcycle_into,
    upcycle_mlp_into_experts,
)


def _dense(d=16, h=40, seed=0):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(d, h), nn.Linear(h, d)
    return fc1, fc2, lambda x: fc2(torch.nn.functional.gelu(fc1(x)))


def _mlp_j(bank, j, v):
    """Expert j on one vector, written out (GELU via erf)."""
    h = v @ bank.w1[j] + bank.b1[j]
    return (0.5 * h * (1 + torch.erf(h / 2**0.5))) @ bank.w2[j] + bank.b2[j]


# ------------------------------------------------------------------------------------------- upcycling
@pytest.mark.parametrize("e,k", [(8, 2), (28, 6)])
def test_upcycled_moe_equals_dense_mlp_before_training(e, k):
    fc1, fc2, dense = _dense()
    moe = upcycle_into(MoEMLP(16, 40, e, k, backend="torch"), fc1, fc2)
    with torch.no_grad():
        moe.router.proj.weight.normal_()  # any routing: renormalized gates sum to 1
    x = torch.randn(3, 11, 16)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def test_upcycled_without_renormalization_is_scaled_by_gate_mass():
    fc1, fc2, dense = _dense()
    moe = upcycle_into(MoEMLP(16, 40, 8, 2, renormalize=False, backend="loop"), fc1, fc2)
    x = torch.randn(9, 16)
    y, _ = moe(x)
    mass = moe.router(x).topk_weights.sum(-1, keepdim=True)
    assert bool((mass < 1).all())
    torch.testing.assert_close(y, mass * dense(x), rtol=1e-5, atol=1e-6)


def test_upcycle_noise_is_relative_seeded_and_breaks_symmetry():
    fc1, fc2, _ = _dense()
    a = upcycle_mlp_into_experts(fc1, fc2, 4, noise_std=0.1, generator=torch.Generator().manual_seed(3))
    b = upcycle_mlp_into_experts(fc1, fc2, 4, noise_std=0.1, generator=torch.Generator().manual_seed(3))
    clean = upcycle_mlp_into_experts(fc1, fc2, 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    assert not torch.allclose(a["w1"][0], a["w1"][1])
    rel = (a["w1"] - clean["w1"]).std() / clean["w1"].std()
    assert rel.item() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(clean["w1"][2], fc1.weight.t())


def test_upcycle_rejects_mismatched_layers():
    fc1, fc2, _ = _dense()
    with pytest.raises(ValueError):
        upcycle_into(MoEMLP(16, 32, 4, 2), fc1, fc2)  # hidden 32 != 40
    with pytest.raises(ValueError):
        upcycle_into(MoEMLP(16, 40, 4, 2, activation="swiglu"), fc1, fc2)
    with pytest.raises(ValueError):
        upcycle_mlp_into_experts(fc1, nn.Linear(39, 16), 4)


# --------------------------------------------------------------------------------------------- Soft MoE
def naive_soft_moe(m: SoftMoEMLP, x: torch.Tensor) -> torch.Tensor:
    """One sequence [N, d], loops over slots and tokens, float64."""
    phi = m.phi / m.phi.norm(dim=0, keepdim=True)
    xn = x / x.norm(dim=-1, keepdim=True)
    logits = m.scale * xn @ phi
    n, s = logits.shape
    disp = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)
    comb = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    slot_out = []
    for slot in range(s):
        xin = sum(disp[t, slot] * x[t] for t in range(n))
        slot_out.append(_mlp_j(m.experts, slot // m.slots_per_expert, xin))
    return torch.stack([sum(comb[t, slot] * slot_out[slot] for slot in range(s)) for t in range(n)])


def _soft(e=4, p=3, seed=0):
    torch.manual_seed(seed)
    m = SoftMoEMLP(12, 20, e, p).double()
    with torch.no_grad():
        m.experts.b1.normal_()
        m.experts.b2.normal_()
        m.scale.fill_(3.0)
    return m


def test_soft_moe_matches_naive_reference_per_sequence():
    m = _soft()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    y, aux = m(x)
    for i in range(2):
        torch.testing.assert_close(y[i], naive_soft_moe(m, x[i]))
    assert 0 < aux["combine_entropy"] <= 1


def test_soft_moe_is_token_permutation_equivariant_and_masks_padding():
    m = _soft()
    x = torch.randn(1, 9, 12, dtype=torch.float64)
    perm = torch.randperm(9)
    y, _ = m(x)
    yp, _ = m(x[:, perm])
    torch.testing.assert_close(yp, y[:, perm])
    # padding tokens change nothing for the real ones and produce zeros
    padded = torch.cat([x, 100 * torch.randn(1, 4, 12, dtype=torch.float64)], 1)
    mask = torch.tensor([[True] * 9 + [False] * 4])
    ym, _ = m(padded, mask)
    torch.testing.assert_close(ym[:, :9], y)
    assert ym[:, 9:].abs().max() == 0


def test_slots_for_topk():
    assert slots_for_topk(196, 8, 2) == 49
    assert slots_for_topk(10, 28, 6) == 3


# ----------------------------------------------------------------------------------------- expert choice
def naive_expert_choice(m: ExpertChoiceMLP, x: torch.Tensor) -> torch.Tensor:
    """One sequence [N, d]: every expert scans the tokens and keeps its c best, float64."""
    n = x.shape[0]
    c = expert_capacity(n, m.num_experts, m.top_k, m.capacity_factor)
    probs = torch.softmax(x @ m.proj.weight.t(), -1)
    y = torch.zeros_like(x)
    for j in range(m.num_experts):
        best = sorted(range(n), key=lambda t: -probs[t, j].item())[:c]
        for t in best:
            y[t] = y[t] + probs[t, j] * _mlp_j(m.experts, j, x[t])
    return y


def test_expert_choice_matches_naive_reference_and_grads():
    torch.manual_seed(0)
    m = ExpertChoiceMLP(12, 20, 5, 2).double()
    with torch.no_grad():
        m.proj.weight.normal_()
        m.experts.b1.normal_()
    x = torch.randn(3, 8, 12, dtype=torch.float64, requires_grad=True)
    y, aux = m(x)
    ref = torch.stack([naive_expert_choice(m, x[i]) for i in range(3)])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    assert 0 <= aux["dropped_token_fraction"] < 1 and aux["router_loss"].requires_grad


def test_expert_choice_capacity_and_balance():
    assert expert_capacity(196, 8, 2) == 49
    assert expert_capacity(10, 2, 6) == 10  # never more than the sequence
    assert expert_capacity(3, 28, 1) == 1
    m = ExpertChoiceMLP(6, 8, 4, 1)
    _, aux = m(torch.randn(2, 16, 6))  # capacity 4 each, 16 slots for 16 tokens
    assert 0 <= aux["dropped_token_fraction"].item() < 1
