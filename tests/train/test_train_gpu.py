"""GPU-only checks (marker `gpu`, deselected in CI): compiled FlexAttention, bf16 autocast, the Triton
experts in a whole student, torch.compile, NCCL. ``benchmarks/gpu_check.sh`` runs them on a GPU;
its ``--cpu-rehearsal`` runs the same code on CPU (``AMOE_GPU_TEST_DEVICE=cpu``, Triton interpreted)."""

from __future__ import annotations

import os

import pytest
import torch

from train.config import ModelConfig
from train.model import Student
from train.packing import build_layout

DEVICE = os.environ.get("AMOE_GPU_TEST_DEVICE", "cuda")
# the reduced precision of the autocast tests: bf16 on CUDA; float16 in the CPU rehearsal, the half type
# Triton's interpreter computes correctly (it gets bf16 wrong)
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_flex_attention_equals_dense_mask_on_cuda():
    torch.manual_seed(0)
    model = Student(ModelConfig(patch_size=16, dim=128, depth=2, num_heads=2, registers=4)).to(DEVICE).eval()
    grids = [(4, 6), (8, 8), (3, 5), (6, 4)]
    layout = build_layout([grids[:2], grids[2:]], seq_len=256, registers=4).to(DEVICE)
    pixels = torch.rand(sum(h * w for h, w in grids), 768, device=DEVICE)
    with torch.no_grad():
        dense = model(pixels, layout, attention="dense")
        flex = model(pixels, layout, attention="flex")
    torch.testing.assert_close(flex.patches, dense.patches, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_step_is_finite():
    torch.manual_seed(0)
    model = Student(ModelConfig(preset="tiny")).to(DEVICE)
    grids = [(4, 6), (8, 8)]
    layout = build_layout([grids], seq_len=128, registers=4).to(DEVICE)
    pixels = torch.rand(88, 768, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(pixels, layout)
        loss = out.patches.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_qk_norm_student_trains_through_flex_under_autocast():
    """The amoe preset's qk-norms under autocast: CUDA runs ``rms_norm`` in float32, so q and k would reach
    FlexAttention's compiled backward float32 next to a bf16 v (refused: mixed dtypes). Flex vs the dense mask,
    outputs and gradients; the CPU rehearsal has no flex backward and compares the forward only."""
    torch.manual_seed(0)
    cfg = ModelConfig(patch_size=16, dim=128, depth=2, num_heads=2, head_dim=64, norm="rmsnorm", qk_norm=True,
                      registers=4)
    model = Student(cfg).to(DEVICE)
    grids = [(4, 6), (8, 8), (3, 5), (6, 4)]
    layout = build_layout([grids[:2], grids[2:]], seq_len=256, registers=4).to(DEVICE)
    g = torch.Generator(DEVICE).manual_seed(1)
    pixels = torch.rand(sum(h * w for h, w in grids), 768, device=DEVICE, generator=g)
    probe = torch.randn(pixels.shape[0], cfg.dim, device=DEVICE, generator=g)
    outs, grads = {}, {}
    for attention in ("dense", "flex"):
        model.zero_grad()
        backward = DEVICE == "cuda" or attention == "dense"
        with torch.set_grad_enabled(backward), torch.autocast(DEVICE, dtype=HALF):
            out = model(pixels, layout, attention=attention)
        outs[attention] = out.patches.float().detach()
        if backward:
            (out.patches.float() * probe).mean().backward()
            grads[attention] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs["flex"], outs["dense"], rtol=0, atol=5e-2)
    if "flex" in grads:
        for name, ref in grads["dense"].items():
            err = (grads["flex"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err <= 5e-2, (name, err.item())


def _moe_student(backend: str) -> Student:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"preset": "tiny", "moe": {"layers": "odd", "experts": 8, "top_k": 2,
                                                                 "backend": backend}})
    return Student(cfg).to(DEVICE)


def _step(model: Student, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward with a fixed random linear read-out of the outputs (a loss on the normed
    outputs' squares would have near-zero gradients: noise, not a test)."""
    grids = [(4, 6), (8, 8), (5, 7)]
    layout = build_layout([grids], seq_len=160, registers=4).to(DEVICE)
    g = torch.Generator(DEVICE).manual_seed(1)
    pixels = torch.rand(sum(h * w for h, w in grids), 768, device=DEVICE, generator=g)
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=HALF, enabled=autocast):
        out = model(pixels, layout)
    probe_p = torch.randn(out.patches.shape, device=DEVICE, generator=g)
    probe_c = torch.randn(out.cls.shape, device=DEVICE, generator=g)
    loss = (out.patches.float() * probe_p).mean() + (out.cls.float() * probe_c).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_training_step_equals_fp32_within_tolerance():
    """One forward/backward of an MoE student on the Triton experts: bf16 autocast vs float32."""
    model = _moe_student("triton")
    loss32, grads32 = _step(model, autocast=False)
    loss16, grads16 = _step(model, autocast=True)
    assert abs(loss16.item() - loss32.item()) <= 1e-3  # a mean of ~unit products: absolute scale
    assert grads16.keys() == grads32.keys()
    for name, g in grads32.items():
        err = (grads16[name].float() - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= 5e-2, (name, err.item())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_triton_student_equals_loop_student_on_cuda(autocast):
    """Whole student, forward and gradients: the Triton experts against the reference loop, in float32
    and under bf16 autocast (the experts then compute in bf16)."""
    triton_model, loop_model = _moe_student("triton"), _moe_student("loop")
    loop_model.load_state_dict(triton_model.state_dict())
    _, got = _step(triton_model, autocast)
    _, ref = _step(loop_model, autocast)
    tol = 1e-4 if not autocast else 3e-2
    for name, g in ref.items():
        err = (got[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err <= tol, (name, err.item())


def test_compiled_student_on_cuda_matches_eager():
    """run.compile's path: inductor over the student with the Triton MoE operators in the graph."""
    model = _moe_student("triton")
    loss_eager, grads_eager = _step(model, autocast=True)
    model.compile(fullgraph=False)
    loss_compiled, grads_compiled = _step(model, autocast=True)
    assert abs(loss_compiled.item() - loss_eager.item()) <= 1e-3
    for name, g in grads_eager.items():
        err = (grads_compiled[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err <= 5e-2, (name, err.item())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_under_torchrun_equal_one_gpu_with_accumulation(train_store, tmp_path):
    """NCCL all-reduce: 2 ranks on 2 GPUs give the losses of 1 GPU with 2 microbatches per step. The student
    has Triton experts: rank 1 launches them on its own GPU (Triton uses the current device)."""
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "pipeline.cli", "train", "--store", train_store, "--model", "tiny", "--steps", "3",
            "--set", "data.seq_len=160", "--set", "data.seqs_per_batch=2", "--set", "data.workers=0",
            "--set", "run.log_every=1", "--set", f"run.device={DEVICE}", "--set", "model.moe.layers=odd",
            "--set", "model.moe.experts=4", "--set", "model.moe.top_k=2", "--set", "model.moe.backend=triton"]
    single = subprocess.run([*base, "--out", str(tmp_path / "one"), "--set", "optim.accumulation=2"],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          *base[1:], "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=2e-2, atol=1e-4)
