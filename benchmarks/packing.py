"""Token-balanced packing vs padded batching: real (non-padding) tokens/s of a training step.

AMoE §3.2 reports 7.5k -> 20k tokens/s from packing. Here both modes train the same student on the
same mixed-resolution store (the demo's: 4x4-token digits and photos up to 256 tokens): ``packed``
fills ``seqs`` sequences of ``seq_len`` slots (FlexAttention-style document mask, dense on CPU),
``padded`` takes ``images`` images per batch and pads each to the longest in the batch. Batches are
loaded before timing, so the figure is the model step (forward, backward, AdamW) alone; the two modes
alternate step by step in one process so machine noise hits both alike.

    python benchmarks/packing.py --store runs/demo/store [--steps 20] [--preset demo]

Writes ``benchmarks/results/packing_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402
from storage.store import FeatureStore  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import PlanStream, StoreBatches  # noqa: E402
from train.model import build_model  # noqa: E402
from train.trainer import batch_to_device, compute_terms  # noqa: E402


def batches(cfg: TrainConfig, store: str, teachers: list[str], n: int) -> list[dict]:
    ds = StoreBatches(store, teachers, cfg.data, patch=cfg.model.patch_size, registers=cfg.model.registers, seed=0)
    plans = PlanStream(ds.reader.indexes, cfg.data, registers=cfg.model.registers, seed=0).steps()
    return [ds[next(plans)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--max-images", type=int, default=24)
    ap.add_argument("--images", type=int, default=16, help="images per padded batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=None, help="results file stem (default packing_<device>)")
    args = ap.parse_args()
    device = torch.device(args.device)
    store = FeatureStore.open(args.store)
    teachers = store.teacher_names
    base = {"model": {"preset": args.preset}, "run": {"attention": "auto"}}
    modes = {
        "packed": TrainConfig.model_validate({**base, "data": {"mode": "packed", "seq_len": args.seq_len,
                                                               "seqs_per_batch": args.seqs, "max_images_per_seq": args.max_images}}),
        "padded": TrainConfig.model_validate({**base, "data": {"mode": "padded", "padded_images": args.images}}),
    }
    torch.manual_seed(0)
    model = build_model(modes["packed"], store, teachers).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")  # as the trainer's
    data = {m: batches(cfg, args.store, teachers, args.warmup + args.steps)
            for m, cfg in modes.items()}
    stats = {m: {"seconds": 0.0, "real": 0, "slots": 0, "images": 0} for m in modes}
    for i in range(args.warmup + args.steps):
        for mode, cfg in modes.items():
            batch = batch_to_device(data[mode][i], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            terms, _ = compute_terms(model, batch, cfg)
            loss = torch.stack(list(terms.values())).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                s = stats[mode]
                s["seconds"] += time.perf_counter() - t0
                s["real"] += batch["real_tokens"]
                s["slots"] += batch["slots"]
                s["images"] += batch["layout"].num_images
    rows, payload = [], {"args": vars(args), "device": str(device), "modes": {}}
    for mode, s in stats.items():
        tps = s["real"] / s["seconds"]
        payload["modes"][mode] = {**s, "tokens_per_s": tps, "images_per_s": s["images"] / s["seconds"],
                                  "fill": s["real"] / s["slots"]}
        rows.append([mode, f"{tps:.0f}", f"{s['images'] / s['seconds']:.1f}", f"{100 * s['real'] / s['slots']:.0f}%"])
    ratio = payload["modes"]["packed"]["tokens_per_s"] / payload["modes"]["padded"]["tokens_per_s"]
    payload["packed_over_padded"] = ratio
    table = md_table(["mode", "real tokens/s", "images/s", "slots holding real tokens"], rows)
    table += f"\n\npacked / padded tokens/s: **{ratio:.2f}x** (AMoE: 20k / 7.5k = 2.67x on A100s)\n"
    write_results(args.name or f"packing_{device.type}", payload, table)
    print(table)


if __name__ == "__main__":
    main()
