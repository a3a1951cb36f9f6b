"""ARKD (AMoE Eq. 7, the reading in train/losses.py) against a float64 pairwise loop, its one-sidedness,
invariances, and the same loss and gradients from two torchrun ranks as from one process."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import LossConfig
from train.losses import arkd_errors, arkd_loss, relational_terms

from arkd_worker import batch


def _loop_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 7 written pair by pair in float64 with Python loops (autograd flows through ``s``)."""
    pairs = list(itertools.combinations(range(len(s)), 2))
    ds = [torch.sqrt(((s[i] - s[j]) ** 2).sum()) for i, j in pairs]
    dt = [float(torch.sqrt(((t[i] - t[j]) ** 2).sum())) for i, j in pairs]
    mean_s, mean_t = sum(ds) / len(ds), sum(dt) / len(dt)
    ds = [d / mean_s for d in ds]
    dt = [d / mean_t for d in dt]
    median = sorted(dt)[(len(dt) - 1) // 2]  # lower middle value for an even count
    total = 0.0
    for a, b in zip(ds, dt):
        e = torch.clamp(a - b, min=0) if b <= median else torch.clamp(b - a, min=0)
        total = total + (0.5 * e**2 if e < 1 else e - 0.5)
    return total / len(pairs)


@pytest.mark.parametrize("rows,dim,scale", [(7, 5, 1.0), (8, 3, 0.3), (12, 16, 4.0)])
def test_equals_a_float64_pairwise_loop_in_value_and_gradient(rows, dim, scale):
    g = torch.Generator().manual_seed(rows)
    s = (scale * torch.randn(rows, dim, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    ref = _loop_reference(s, t)
    (ref_grad,) = torch.autograd.grad(ref, s)
    s32 = s.detach().float().requires_grad_(True)
    got = arkd_loss(s32, t.float())
    got.backward()
    assert float(got.detach()) > 0
    assert float(got) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s32.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_zero_for_a_scaled_rotated_shifted_copy_of_the_teacher():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(10, 6, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    for s in (3.0 * t, 0.2 * t @ rotation + 5.0):  # PHI-S: a scaled rotation plus a shift
        assert float(arkd_loss(s, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(arkd_loss(t[:1], t[:1])) == 0.0  # one image: no pair


def test_one_sided_errors_near_pairs_only_pulled_far_pairs_only_pushed():
    d_t = torch.tensor([0.5, 0.8, 1.2, 1.5])  # median (lower middle) 0.8: pairs 0, 1 near; 2, 3 far
    closer, apart = torch.tensor([0.2, 0.6, 1.0, 1.2]), torch.tensor([0.9, 1.1, 1.6, 2.0])
    assert arkd_errors(closer, d_t)[:2].tolist() == [0.0, 0.0]  # near pairs pulled together: no error
    torch.testing.assert_close(arkd_errors(apart, d_t)[:2], torch.tensor([0.4, 0.3]))  # pushed apart: penalized
    assert arkd_errors(apart, d_t)[2:].tolist() == [0.0, 0.0]  # far pairs pushed apart: no error
    torch.testing.assert_close(arkd_errors(closer, d_t)[2:], torch.tensor([0.2, 0.3]))  # pulled together: penalized


def test_a_near_pair_pushed_apart_is_penalized_and_pulled_back_while_pulled_together_it_is_not():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(16, 4, generator=g)
    dist = torch.cdist(t, t) + torch.eye(16) * 1e9
    i, j = sorted(divmod(int(dist.argmin()), 16))  # the teacher's closest pair: near
    k = [p for p in itertools.combinations(range(16), 2)].index((i, j))  # its place in pdist order
    normalized = lambda x: torch.pdist(x) / torch.pdist(x).mean()  # noqa: E731
    for sign in (+1, -1):
        s = t.clone()
        s[j] = t[j] + sign * 0.5 * (t[j] - t[i])  # +: pushed apart, -: pulled together
        errors = arkd_errors(normalized(s), normalized(t))
        s.requires_grad_(True)
        arkd_loss(s, t).backward()
        if sign > 0:
            assert float(errors[k]) > 0.1 * float(normalized(t)[k])
            assert float(((s.grad[j] - s.grad[i]) * (t[j] - t[i])).sum()) > 0  # descent moves s_j back to s_i
        else:
            assert float(normalized(s)[k]) < float(normalized(t)[k]) and float(errors[k]) == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        arkd_loss(torch.zeros(4, 3), torch.zeros(4, 2))


def test_weighted_per_teacher_and_off_by_default():
    s, t = batch()
    preds = {"a": {"summary": s.float()}, "b": {"summary": s.float()}}
    targets = {"a": {"summary": t.float()}, "b": {"summary": t.float()}}
    assert relational_terms(preds, targets, LossConfig(), 1.0) == {}
    terms = relational_terms(preds, targets, LossConfig(arkd={"a": 2.0}, teacher_weights={"a": 0.5}), 0.25)
    assert list(terms) == ["a/arkd"]
    assert float(terms["a/arkd"]) == pytest.approx(2.0 * 0.5 * 0.25 * float(arkd_loss(s.float(), t.float())), rel=1e-6)
    with pytest.raises(ValueError, match="loss.arkd"):
        LossConfig(arkd=-1.0)


def test_two_torchrun_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    worker = Path(__file__).with_name("arkd_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(worker), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ddp = torch.load(out, weights_only=True)
    s, t = batch()
    whole = s.float().clone().requires_grad_(True)
    term = relational_terms({"t": {"summary": whole}}, {"t": {"summary": t.float()}}, LossConfig(arkd=0.7), 1.0)["t/arkd"]
    term.backward()
    assert float(ddp["value"]) == pytest.approx(float(term), rel=1e-5)
    torch.testing.assert_close(ddp["grad"], whole.grad, rtol=1e-4, atol=1e-6)
