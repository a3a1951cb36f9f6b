"""Helpers shared by the benchmark scripts: machine facts and JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# AMOE_BENCH_RESULTS redirects the output (gpu_check.sh --cpu-rehearsal writes toy-size results elsewhere)
RESULTS = Path(os.environ.get("AMOE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    import torch

    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, payload: dict, table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    md.write_text(table.rstrip() + "\n")
    return js, md


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
