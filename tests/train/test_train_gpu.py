"""GPU-only checks (marker `gpu`, deselected in CI): compiled FlexAttention and bf16 autocast paths."""

from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.model import Student
from train.packing import build_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_flex_attention_equals_dense_mask_on_cuda():
    torch.manual_seed(0)
    model = Student(ModelConfig(patch_size=16, dim=128, depth=2, num_heads=2, registers=4)).cuda().eval()
    grids = [(4, 6), (8, 8), (3, 5), (6, 4)]
    layout = build_layout([grids[:2], grids[2:]], seq_len=256, registers=4).to("cuda")
    pixels = torch.rand(sum(h * w for h, w in grids), 768, device="cuda")
    with torch.no_grad():
        dense = model(pixels, layout, attention="dense")
        flex = model(pixels, layout, attention="flex")
    torch.testing.assert_close(flex.patches, dense.patches, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_step_is_finite():
    torch.manual_seed(0)
    model = Student(ModelConfig(preset="tiny")).cuda()
    grids = [(4, 6), (8, 8)]
    layout = build_layout([grids], seq_len=128, registers=4).to("cuda")
    pixels = torch.rand(88, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(pixels, layout)
        loss = out.patches.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
