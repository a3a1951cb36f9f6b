"""A run's metrics: ``metrics.jsonl`` (one JSON record per logged step) and TensorBoard, on rank 0 only.

On resume the lines after the checkpoint's step are dropped first, so a resumed run's log reads as
if it had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .rundir import RunDir

__all__ = ["MetricsLog"]


class MetricsLog:
    """metrics.jsonl + TensorBoard; on resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        files = RunDir(run)
        self.path = files.metrics
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(files.tensorboard), purge_step=resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
