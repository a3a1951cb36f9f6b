"""MoE MLP layer speed: forward + backward tokens/s per grouped-GEMM backend vs a dense MLP.

Expert hidden size is fine-grained (M2oT, after Ludziejewski et al.): ``h = 4 * d / k`` so that the
k active experts of a token cost exactly the FLOPs of the dense MLP with hidden ``4 * d`` that they
replace (E=8,k=2 -> h=1536; E=28,k=6 -> h=512 at d=768). The dense baseline is that MLP (Linear,
GELU, Linear), so ``moe / dense`` is the price of routing, dispatch and grouped GEMM at equal FLOPs.

    python benchmarks/moe_layer.py                      # CPU: loop vs torch, float32, 4096 tokens
    python benchmarks/moe_layer.py --device cuda        # GPU: triton vs torch vs loop, bf16, 65536 tokens

FLOPs counted: the two expert GEMMs (and the dense MLP's two), 2*m*n*k per GEMM, x3 for forward
plus backward. Router, dispatch and combine are not counted (they are the overhead being measured).
Writes ``benchmarks/results/moe_layer_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402
from train.model import DenseMLP  # noqa: E402
from train.moe import MoEMLP, fine_grained_hidden  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fns(model: nn.Module, x: torch.Tensor) -> dict:
    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        y, aux = model(x)
        loss = y.float().square().mean() + (aux["router_loss"] if "router_loss" in aux else 0.0)
        loss.backward()

    def fwd():
        with torch.no_grad():
            model(x)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def time_interleaved(models: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int) -> dict[str, dict]:
    """Median seconds of forward and forward+backward per model.

    Rounds alternate between the models, so a load change on a shared machine hits all of them alike
    instead of biasing whichever happened to run during it.
    """
    fns = {name: _step_fns(m, x) for name, m in models.items()}
    times = {name: {"fwd": [], "fwd_bwd": []} for name in models}
    for r in range(warmup + repeats):
        for name, steps in fns.items():
            for kind, fn in steps.items():
                _sync(x.device)
                t0 = time.perf_counter()
                fn()
                _sync(x.device)
                if r >= warmup:
                    times[name][kind].append(time.perf_counter() - t0)
    return {name: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=None, help="default 4096 (cpu) / 65536 (cuda)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default float32 (cpu) / bfloat16 (cuda)")
    ap.add_argument("--backends", default=None, help="comma list; default loop,torch (cpu) / triton,torch,loop (cuda)")
    ap.add_argument("--configs", default="8x2,28x6", help="experts x top_k, comma separated")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default=None, help="results file stem (default moe_layer_<device>)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tokens = args.tokens or (65536 if cuda else 4096)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    backends = (args.backends or ("triton,torch,loop" if cuda else "loop,torch")).split(",")
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    d, dense_hidden = args.dim, int(args.mlp_ratio * args.dim)
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=device, dtype=dtype)

    dense_flops = 3 * 2 * 2 * tokens * d * dense_hidden
    models: dict[str, nn.Module] = {"dense": DenseMLP(d, dense_hidden).to(device, dtype)}
    specs = {"dense": dict(layer="dense", experts=1, top_k=1, hidden=dense_hidden, backend="-", flops=dense_flops)}
    for e, k in configs:
        h = fine_grained_hidden(d, args.mlp_ratio, k)
        for be in backends:
            name = f"moe E={e} k={k} {be}"
            models[name] = MoEMLP(d, h, e, k, backend=be).to(device, dtype)
            specs[name] = dict(layer="moe", experts=e, top_k=k, hidden=h, backend=be, flops=3 * 2 * 2 * tokens * k * d * h)
    timed = time_interleaved(models, x, args.warmup, args.repeats)

    rows, records = [], []
    dense_t = timed["dense"]["fwd_bwd"]
    for name, spec in specs.items():
        t = timed[name]
        records.append(dict(**spec, **t, tokens_per_s=tokens / t["fwd_bwd"], tflops=spec["flops"] / t["fwd_bwd"] / 1e12,
                            speed_vs_dense=dense_t / t["fwd_bwd"]))
        label = "dense" if spec["layer"] == "dense" else f"moe E={spec['experts']} k={spec['top_k']}"
        rows.append([label, spec["backend"], spec["hidden"], f"{spec['flops'] / dense_flops:.2f}", tokens / t["fwd_bwd"],
                     spec["flops"] / t["fwd_bwd"] / 1e12, dense_t / t["fwd_bwd"], t["fwd"] * 1e3])

    header = ["layer", "backend", "expert hidden", "active FLOPs / dense", "tokens/s (fwd+bwd)",
              "TFLOP/s (fwd+bwd)", "speed vs dense", "fwd ms"]
    title = (f"### MoE MLP layer, {args.device}, {str(dtype).replace('torch.', '')}, {tokens} tokens, d={d}, "
             f"dense hidden {dense_hidden}, torch threads {torch.get_num_threads()}\n\n")
    table = title + md_table(header, rows)
    payload = dict(device=args.device, dtype=str(dtype), tokens=tokens, dim=d, dense_hidden=dense_hidden,
                   warmup=args.warmup, repeats=args.repeats, results=records)
    js, md = write_results(args.name or f"moe_layer_{args.device}", payload, table)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
