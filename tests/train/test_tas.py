"""M²oT's Teacher-Aware Specialization loss (Eq. 8; reconstruction in train/losses.py and train/moe/tas.py):
the loss against a float64 loop, each chosen expert's own output, and the term in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.losses import tas_loss
from train.moe import MoEMLP


def _loop(expert_out, logits, topk, pi, targets, weights) -> torch.Tensor:
    """Eq. 8 token by token and choice by choice, float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(expert_out.shape[0]):
        probs = torch.softmax(logits[t].double(), -1)
        for j in range(topk.shape[1]):
            e = int(topk[t, j])
            mixed = sum(pi[t, e, i].double() * targets[i, t].double() for i in range(targets.shape[0]))
            total = total + weights[t].double() * probs[e] * (expert_out[t, j].double() - mixed).abs().mean()
    return total


def test_tas_loss_equals_a_float64_loop_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    T, k, E, N, d = 9, 2, 4, 3, 5
    expert_out = torch.randn(T, k, d, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    topk = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    pi_logits = torch.randn(T, E, N, generator=g, requires_grad=True)
    targets = torch.randn(N, T, d, generator=g)
    weights = torch.rand(T, generator=g)
    got = tas_loss(expert_out, logits, topk, pi_logits.softmax(-1), targets, weights)
    ref = _loop(expert_out, logits, topk, pi_logits.softmax(-1), targets, weights)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    grads = torch.autograd.grad(got, (expert_out, logits, pi_logits))
    refs = torch.autograd.grad(ref, (expert_out, logits, pi_logits))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
        assert b.abs().sum() > 0  # the experts, the router and π all learn from it


def test_an_moe_layer_keeps_each_chosen_experts_own_output():
    torch.manual_seed(0)
    mlp = MoEMLP(6, 10, num_experts=4, top_k=2, backend="loop")
    mlp.keep_expert_outputs = True
    x = torch.randn(7, 6)
    y, aux = mlp(x)
    w1, b1, w2, b2 = mlp.experts.w1, mlp.experts.b1, mlp.experts.w2, mlp.experts.b2
    gates = torch.softmax(aux["router_logits"], -1).gather(1, aux["expert_idx"])
    for t in range(7):
        for j in range(2):
            e = int(aux["expert_idx"][t, j])
            own = F.gelu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]  # expert e on token t, by hand
            torch.testing.assert_close(aux["expert_out"][t, j], own, rtol=1e-5, atol=1e-6)
    if not mlp.router.renormalize:
        torch.testing.assert_close(y, (gates.unsqueeze(-1) * aux["expert_out"]).sum(1), rtol=1e-5, atol=1e-6)


def test_tas_joins_training_as_its_own_term_and_needs_an_moe_student(train_store, tmp_path):
    from storage.store import FeatureStore
    from train.config import TrainConfig
    from train.data import PlanStream, StoreBatches
    from train.model import build_model
    from train.trainer import batch_to_device, compute_terms

    cfg = TrainConfig.model_validate({
        "model": {"preset": "tiny", "moe": {"layers": "all", "experts": 3, "top_k": 2, "backend": "loop"}},
        "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0}, "loss": {"tas": 0.5}})
    store = FeatureStore.open(train_store)
    torch.manual_seed(0)
    model = build_model(cfg, store, store.teacher_names)
    assert set(model.tas) == {"0", "1"} and sum(p.numel() for p in model.tas.parameters()) > 0
    ds = StoreBatches(train_store, store.teacher_names, cfg.data, patch=16, registers=cfg.model.registers, seed=0)
    plan = next(PlanStream(ds.reader.indexes, cfg.data, registers=cfg.model.registers, seed=0).steps())
    terms, _ = compute_terms(model, batch_to_device(ds[plan], torch.device("cpu")), cfg)
    assert float(terms["tas"]) > 0
    terms["tas"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tas.parameters())
    dense = cfg.model_copy(update={"model": cfg.model.model_copy(update={"moe": cfg.model.moe.model_copy(
        update={"layers": "none"})})})
    with pytest.raises(ValueError, match="loss.tas needs token-choice MoE layers"):
        build_model(dense, store, store.teacher_names)
    np.testing.assert_array_equal(model.tas["0"].proj_0.numpy(), build_model(cfg, store, store.teacher_names)
                                  .tas["0"].proj_0.numpy())  # the fixed target maps are seeded, not drawn
