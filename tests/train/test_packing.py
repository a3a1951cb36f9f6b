"""Packing: plans keep every image once within budget, and a packed forward equals each image alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.config import ModelConfig
from train.model import Student
from train.model.attention import document_mask
from train.packing import build_layout, grid_coords, pack_stream, padded_stream

GRIDS = [(2, 3), (4, 4), (1, 5), (3, 2), (5, 3), (2, 2)]


def _student(**kw) -> Student:
    torch.manual_seed(0)
    return Student(ModelConfig(patch_size=4, dim=32, depth=2, num_heads=2, registers=2, **kw)).eval()


def _pixels(grids, patch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(gh * gw, 3 * patch * patch, generator=g) for gh, gw in grids]


def test_packed_forward_equals_each_image_alone():
    model = _student()
    pix = _pixels(GRIDS)
    sequences = [GRIDS[:3], GRIDS[3:]]
    layout = build_layout(sequences, seq_len=48, registers=2)
    with torch.no_grad():
        packed = model(torch.cat(pix), layout, attention="dense")
        offset = 0
        for i, (grid, p) in enumerate(zip(GRIDS, pix)):
            alone = model(p, build_layout([[grid]], seq_len=3 + grid[0] * grid[1], registers=2), attention="dense")
            n = grid[0] * grid[1]
            torch.testing.assert_close(packed.cls[i], alone.cls[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.registers[i], alone.registers[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.patches[offset:offset + n], alone.patches, rtol=0, atol=1e-5)
            offset += n


def test_packing_changes_nothing_for_moe_blocks_either():
    model = _student(moe={"layers": "all", "experts": 4, "top_k": 2, "backend": "loop"})
    pix = _pixels(GRIDS[:4])
    with torch.no_grad():
        packed = model(torch.cat(pix), build_layout([GRIDS[:2], GRIDS[2:4]], 40, 2), attention="dense")
        alone = model(pix[3], build_layout([[GRIDS[3]]], 3 + 6, 2), attention="dense")
    torch.testing.assert_close(packed.cls[3], alone.cls[0], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_dense_mask():
    model = _student()
    pix = _pixels(GRIDS)
    layout = build_layout([GRIDS[:3], GRIDS[3:]], seq_len=64, registers=2)  # 64: a multiple of flex's block
    with torch.no_grad():
        dense = model(torch.cat(pix), layout, attention="dense")
        flex = model(torch.cat(pix), layout, attention="flex")
    torch.testing.assert_close(flex.patches, dense.patches, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex.cls, dense.cls, rtol=0, atol=1e-5)


class _Float32RMSNorm(torch.nn.Module):
    """An RMS norm that returns float32 for a bf16 input, as CUDA autocast runs ``rms_norm`` (CPU autocast does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_gets_one_dtype_when_the_qk_norms_return_float32(monkeypatch):
    """FlexAttention's backward refuses mixed q/k/v dtypes; on CUDA under bf16 autocast the qk-norms (the amoe
    preset's) return float32 while v is bf16. CPU flex has no backward, so the kernel's inputs are checked here."""
    from torch.nn.attention.flex_attention import flex_attention

    from train.model import attention

    seen = []

    def recording_flex(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return flex_attention(q, k, v, **kw)

    monkeypatch.setattr(attention, "_flex", lambda cuda: recording_flex)
    model = _student(qk_norm=True)
    for block in model.blocks:
        block.attn.q_norm, block.attn.k_norm = _Float32RMSNorm(), _Float32RMSNorm()
    layout = build_layout([GRIDS[:3], GRIDS[3:]], seq_len=64, registers=2)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model(torch.cat(_pixels(GRIDS)), layout, attention="flex")
    assert len(seen) == 2 and all(d == (torch.bfloat16,) * 3 for d in seen), seen


def test_mask_never_crosses_images():
    layout = build_layout([GRIDS[:3]], seq_len=40, registers=2)
    mask = document_mask(layout.doc_ids, "dense").mask[0, 0]
    ids = layout.doc_ids[0]
    for q in range(40):
        for k in range(40):
            assert bool(mask[q, k]) == bool(ids[q] == ids[k])


def test_layout_positions_and_coordinates():
    layout = build_layout([GRIDS[:2], GRIDS[2:3]], seq_len=30, registers=2)
    assert layout.cls_pos.tolist() == [0, 9, 30]
    assert layout.reg_pos.tolist() == [[1, 2], [10, 11], [31, 32]]
    assert len(layout.patch_pos) == 6 + 16 + 5 and len(set(layout.patch_pos.tolist())) == 27
    c = grid_coords(2, 3)
    assert np.allclose(c[:, 0], [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5]) and np.allclose(c[:3, 1], [-2 / 3, 0, 2 / 3])
    with pytest.raises(ValueError, match="overflows"):
        build_layout([[(5, 5)]], seq_len=20, registers=2)


def test_pack_stream_keeps_every_image_once_within_budget():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=500)
    stream = ((0, r) for r in range(500))
    mbs = list(pack_stream(stream, lambda r: int(tokens[r]), seq_len=64, seqs=3, max_images=4))
    rows = [r for mb in mbs for r in mb.rows]
    assert sorted(rows) == list(range(500))
    for mb in mbs:
        assert len(mb.sequences) <= 3
        for seq in mb.sequences:
            assert 1 <= len(seq) <= 4 and sum(tokens[r] for r in seq) <= 64
    fill = tokens.sum() / (len(mbs) * 3 * 64)
    assert fill > 0.75, f"first-fit packing wastes too much: {fill:.2f}"
    with pytest.raises(ValueError, match="more than seq_len"):
        list(pack_stream(iter([(0, 0)]), lambda r: 65, seq_len=64, seqs=1, max_images=1))


def test_padded_stream_pads_to_the_longest():
    tokens = [3, 9, 4, 7, 2]
    mbs = list(padded_stream(((0, r) for r in range(5)), lambda r: tokens[r], images=2))
    assert [mb.seq_len for mb in mbs] == [9, 7, 2]
    assert [mb.rows for mb in mbs] == [[0, 1], [2, 3], [4]]
