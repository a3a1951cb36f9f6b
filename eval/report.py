"""A run's report: Markdown with PNG loss curves and a section per evaluation task of eval.json (kNN, zero-shot,
retrieval, dense probes, head ensembling, routing) with student-teacher agreement."""

from __future__ import annotations

import json
from pathlib import Path

from train.rundir import RunDir

__all__ = ["write_report"]


def _records(run: Path) -> list[dict]:
    path = RunDir(run).metrics
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _plot(records: list[dict], keys: list[str], path: Path, title: str, log: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key.removeprefix("loss/"), lw=1.2)
    ax.set_xlabel("step")
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run: Path, extra: dict | None = None) -> Path:
    """Write ``run/report.md`` (and its PNGs) from metrics.jsonl and eval.json; returns the path."""
    records = _records(run)
    lines = [f"# Run report: {run.name}", ""]
    if extra:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in extra.items()] + [""]
    if records:
        _plot(records, ["loss"], run / "loss.png", "total loss (Eq. 6)")
        terms = sorted(k for k in records[-1] if k.startswith("loss/"))
        _plot(records, terms, run / "loss_terms.png", "loss terms per teacher and feature")
        tail = records[len(records) // 2:]
        wait = sum(r["data_wait"] * r["step_time"] for r in tail) / max(1e-9, sum(r["step_time"] for r in tail))
        tok = sum(r["tokens_per_s"] * r["step_time"] for r in tail) / max(1e-9, sum(r["step_time"] for r in tail))
        lines += ["## Training", "", f"- steps logged: {len(records)}, final loss {records[-1]['loss']:.4f} "
                  f"(first {records[0]['loss']:.4f})",
                  f"- second half of the run: {tok:.0f} real tokens/s, data wait {100 * wait:.1f}% of step time", "",
                  "![loss](loss.png)", "", "![loss terms](loss_terms.png)", ""]
        entropy = sorted(k for k in records[-1] if k.startswith("moe/") and k.endswith("_entropy"))
        if entropy:  # both normalized forms, per MoE layer (1 = uniform)
            _plot(records, entropy, run / "routing_entropy.png", "normalized routing entropy per MoE layer", log=False)
            lines += ["![routing entropy](routing_entropy.png)", ""]
    ev_path = RunDir(run).eval
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else {}
    if "knn" in ev:
        knn = ev["knn"]
        top1 = knn["top1"]
        teachers = sorted(k.split("/", 1)[1] for k in top1 if k.startswith("teacher/"))
        lines += ["## kNN top-1", "",
                  f"k = {knn['k']}, T = {knn['temperature']}; {knn['query_images']} queries ({knn['queries']}) against "
                  f"{knn['bank_images']} labelled neighbours ({knn['bank']}); checkpoint step {ev['checkpoint_step']}.", "",
                  "| features | top-1 | student / teacher |", "|---|---|---|",
                  f"| student backbone CLS | {top1['student/cls']:.3f} | |"]
        for t in teachers:
            teacher = top1[f"teacher/{t}"]
            ratio = f"{top1[f'student/{t}'] / teacher:.3f}" if teacher else "n/a"
            lines += [f"| student head {t} | {top1[f'student/{t}']:.3f} | {ratio} |", f"| teacher {t} (cached) | {teacher:.3f} | |"]
        lines += ["", "## Student-teacher cosine on the evaluation store (teacher space)", "",
                  "| head / feature | mean cosine |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(ev.get("cosine", {}).items())]
        if ev.get("relational_error"):
            lines += ["", "## Relational error on the evaluation store (mean |d^S − d^T| of mean-normalized pair "
                      "distances; 0 = the teacher's geometry)", "", "| head | relational error |", "|---|---|"]
            lines += [f"| {k} | {'n/a' if v is None else f'{v:.3f}'} |" for k, v in sorted(ev["relational_error"].items())]
        lines.append("")
    if "zeroshot" in ev:
        lines += _zeroshot_lines(ev["zeroshot"])
    if "retrieval" in ev:
        lines += _retrieval_lines(ev["retrieval"])
    if "seg" in ev:
        lines += _seg_lines(ev["seg"])
    if "ensemble" in ev:
        lines += _ensemble_lines(ev["ensemble"])
    if "routing" in ev:
        lines += _routing_lines(ev["routing"])
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _routing_lines(routing: dict) -> list[str]:
    """Per MoE block: tokens per expert, stability, teacher affinity and CKA (eval/routing.py), and the heatmaps."""
    lines = ["## Routing", "", f"Top-1 experts of the patch tokens of {routing['images']} images; "
             f"stability against {routing['compared_with'] or 'no earlier checkpoint'}.", ""]
    for layer, entry in routing["layers"].items():
        experts = len(entry["tokens"])
        lines += [f"### MoE block {layer}" + (f" ({100 * entry['stability']:.1f}% of tokens changed expert)"
                                            if entry.get("stability") is not None else ""), "",
                  "| | " + " | ".join(f"e{e}" for e in range(experts)) + " |", "|---|" + "---|" * experts,
                  "| tokens | " + " | ".join(map(str, entry["tokens"])) + " |"]
        history = entry.get("stability_history") or []
        if len(history) > 1:  # changed expert between each pair of consecutive kept checkpoints
            lines[-4:-4] = ["Tokens that changed expert, between consecutive checkpoints: " + ", ".join(
                f"{h['since']}→{h['step']} {100 * h['changed']:.1f}%" for h in history if h["changed"] is not None), ""]
        for name, values in [*(("cosine " + t, v) for t, v in entry["affinity"].items()),
                             *(("TAS π " + t, v) for t, v in entry.get("tas_pi", {}).items()),
                             *(("CKA " + k, v) for k, v in entry["cka"].items())]:
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
        lines.append("")
    lines += [f"![CKA]({p})" for p in routing.get("plots", [])] + [""]
    return lines


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _zeroshot_lines(zeroshot: dict) -> list[str]:
    """Per cached class set: the head's agreement with its teacher's prediction, and accuracies where labelled."""
    lines = ["## Zero-shot", "", f"Over {zeroshot['images']} images of {zeroshot['store']}; the head's summary, mapped "
             "back to its teacher's space, scored against the class embeddings the teacher cached.", "",
             "| set | kind | classes | head agrees with teacher | head top-1 | teacher top-1 |", "|---|---|---|---|---|---|"]
    for key, entry in zeroshot["sets"].items():
        t, top1 = entry["teacher"], entry.get("top1", {})
        lines.append(f"| {key} | {entry['kind']} | {entry['classes']} | {_fmt(entry['agreement'][f'student/{t}'])} | "
                     f"{_fmt(top1.get(f'student/{t}'))} | {_fmt(top1.get(f'teacher/{t}'))} |")
    return lines + [""]


def _retrieval_lines(retrieval: dict) -> list[str]:
    lines = ["## Image-text retrieval", "", "| set | images / captions | features | image→text R@1 / R@5 | "
             "text→image R@1 / R@5 |", "|---|---|---|---|---|"]
    for key, entry in retrieval["sets"].items():
        for name, i2t in entry["image_to_text"].items():
            t2i = entry["text_to_image"][name]
            lines.append(f"| {key} | {entry['images']} / {entry['captions']} | {name} | "
                         + " / ".join(f"{v:.3f}" for v in i2t.values()) + " | "
                         + " / ".join(f"{v:.3f}" for v in t2i.values()) + " |")
    return lines + [""]


def _seg_lines(seg: dict) -> list[str]:
    """The dense linear probes (eval/dense.py): mIoU and pixel accuracy, or RMSE, per feature."""
    protocol = (f"{seg['train_images']} training / {seg['test_images']} test images of {seg['store']}; "
                f"{seg['epochs']} epochs (at least {seg.get('min_steps', 0)} steps), batch {seg['batch_size']}, "
                f"lr {seg['lr']}")
    if seg["kind"] == "classes":
        classes = seg["classes"]
        lines = ["## Dense linear probe: segmentation", "", f"Per-pixel classes ({len(classes)}: "
                 f"{', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}); {protocol}.", "",
                 "| features | mIoU | pixel accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {v:.3f} | {seg['pixel_accuracy'][name]:.3f} |" for name, v in seg["miou"].items()]
        ref = seg["majority_class"]
        lines.append(f"| (the most frequent class, {classes[ref['class']]}, everywhere) | {ref['miou']:.3f} | "
                     f"{ref['pixel_accuracy']:.3f} |")
    else:
        lines = ["## Dense linear probe: per-pixel regression", "", f"RMSE in target units (stored / {seg['scale']:g}); "
                 f"{protocol}.", "", "| features | RMSE |", "|---|---|"]
        lines += [f"| {name} | {v:.3f} |" for name, v in seg["rmse"].items()]
        lines.append(f"| (the training mean everywhere) | {seg['rmse_of_train_mean']:.3f} |")
    return lines + [""]


def _ensemble_lines(ensemble: dict) -> list[str]:
    """AMoE's entropy-weighted head ensembling next to each head alone (eval/ensemble.py)."""
    lines = ["## Head ensembling (entropy-weighted)", "", f"γ = {ensemble['gamma']}, ε = {ensemble['eps']}.", "",
             "| task | features | each head | ensemble |", "|---|---|---|---|"]
    knn = ensemble.get("knn") or {}
    for side in ("student", "teacher"):
        if side in knn:
            heads = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in knn[side].items() if "/" in k)
            lines.append(f"| kNN top-1 | {side} | {heads} | {knn[side]['ensemble']:.3f} |")
    for name, entry in ensemble.get("zeroshot", {}).items():
        agree = entry["agreement_with_teacher_ensemble"]
        heads = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in agree.items() if "/" in k)
        lines.append(f"| zero-shot {name}: agreement with the teachers' ensemble | student | {heads} | "
                     f"{agree['ensemble']:.3f} |")
        for side, top1 in entry.get("top1", {}).items():
            heads = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in top1.items() if "/" in k)
            lines.append(f"| zero-shot {name} top-1 | {side} | {heads} | {top1['ensemble']:.3f} |")
    for name, entry in ensemble.get("retrieval", {}).items():
        for side in ("student", "teacher"):
            for direction, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
                heads = ", ".join(f"{k.split('/')[1]} {v[direction]['r1']:.3f}" for k, v in entry[side].items()
                                  if "/" in k)
                lines.append(f"| retrieval {name} {label} R@1 | {side} | {heads} | "
                             f"{entry[side]['ensemble'][direction]['r1']:.3f} |")
    return lines + [""]
