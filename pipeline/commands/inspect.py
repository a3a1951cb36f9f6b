"""`pipeline inspect STORE`: one screen about a feature store."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..console import console, fail, failures_text, user_errors


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _codec(t: dict) -> str:
    """The codec and the worst centred patch cosine to the float32 targets its writers measured (sampled units)."""
    measured = (t.get("codec_fidelity") or {}).get("patches") or {}
    worst = measured.get("min_centred_cosine", measured.get("min_cosine"))
    return t["codec"] + (f" (sampled min cos {worst:.4f})" if worst is not None else "")


def inspect_store(
    store: Annotated[str, typer.Argument(help="store directory or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print the facts as JSON")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="read every committed unit; name and un-commit damaged ones "
                                                          "(exit 2), so that rerunning cache-teachers repairs them")] = False,
) -> None:
    """Images, failures, teachers, dims, bytes on disk per image and per token, compression, PHI-S."""
    from storage.inspect import describe_store

    if verify:
        _verify(store)
        return
    with user_errors(store):
        facts = describe_store(store)
    if as_json:
        print(json.dumps(facts, indent=2, default=str))
        return
    pol = facts["image_policy"]
    console.print(f"[bold]{facts['url']}[/bold]  (format v{facts['format_version']}, {facts['created_by']})")
    console.print(f"image policy: patch {pol['patch_size']}, tokens [{pol['min_tokens']}, {pol['max_tokens']}], {pol['format']}")
    im = facts["images"]
    if im is None:
        console.print("[yellow]images not complete (an interrupted cache-teachers: rerun it to finish)[/yellow]")
        return
    tpi = im["tokens_per_image"]
    labels = "none" if im["labels"] is None else f"{im['labels']} of {im['count']} images"
    console.print(
        f"images: {im['count']} (failed {failures_text(im['failed'], im['failure_reasons'])}); tokens/image "
        f"min {tpi['min']} mean {tpi['mean']:.1f} max {tpi['max']}, total {tpi['total']}; "
        f"pixels {_mb(im['pixel_bytes_on_disk'])} ({_mb(im['pixel_bytes_per_image'])}/image); labels: {labels}"
    )
    if im.get("masks"):
        m = im["masks"]
        what = (f"{len(m['classes'])} named classes" if m["classes"] else "class indices") if m["kind"] == "classes" \
            else f"values / {m['scale']:g}"
        console.print(f"masks: {m['kind']} ({what}) on {m['images']} images, {_mb(m['bytes_on_disk'])}")
    table = Table("teacher", "dims (summary/patch)", "regs", "codec", "units", "targets on disk", "per image",
                  "per token", "compression", "PHI-S files", "PHI-S summary / patches")
    for name, t in facts["teachers"].items():
        phis = " / ".join(
            f"{p['method']} s={p['scale']:.3g} top={p['top_eigen_share']:.2f}" if p else "-" for p in t["phis"].values()
        )
        ratio = f"{t['compression_ratio']:.2f}x" if t["compression_ratio"] else "-"
        status = f"{t['units_committed']}/{t['units_total']}" + ("" if t["complete"] else " (incomplete)")
        table.add_row(
            name + (" (resampled)" if t["resampled"] else ""),
            f"{t['dims']['summary']}/{t['dims']['patches']}",
            str(t["num_registers"]), _codec(t), status, _mb(t["bytes_on_disk"]),
            _mb(t["bytes_per_image"]), f"{t['bytes_per_token']:.0f} B", ratio, _mb(t["phis_bytes"]), phis,
        )
    console.print(table)
    for name, t in facts["teachers"].items():
        layers = [f"{k} ({v['dim']}-d" + (")" if v["complete"] else f", {v['units_committed']} units, incomplete)")
                  for k, v in t.get("layers", {}).items()]
        if layers:
            console.print(f"{name}: layers {', '.join(layers)}")
        if t.get("text"):
            console.print(f"{name}: text sets " + ", ".join(f"{k} ({v['kind']}, {v['rows']} rows)"
                                                            for k, v in t["text"].items()))


def _verify(store: str) -> None:
    from storage.verify import verify_store

    with user_errors(store):
        report = verify_store(store, repair=True)
    if not report.damaged:
        console.print(f"{store}: {report.units_checked} committed units read, no damage")
        return
    table = Table("part", "unit", "damage", title=f"damage in {store}")
    for d in report.damaged:
        table.add_row(d.part, str(d.unit), d.reason)
    console.print(table)
    parts = sorted({d.part for d in report.damaged})
    fail(f"{store}: {len(report.damaged)} damaged chunk range(s) in " + ", ".join(
        f"{part} units {report.units(part)}" for part in parts) + "; they are un-committed: rerun cache-teachers "
        "with the same IMAGES (and teacher, and --layers K for a damaged layer K) to rewrite them")
