"""Running the `pipeline` command as a user does (a subprocess), and checking how it fails."""

from __future__ import annotations

import os
import subprocess
import sys

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_pipeline(*args: str, env: dict | None = None, timeout: float = 600, new_session: bool = False
                 ) -> subprocess.CompletedProcess:
    """``pipeline ARGS`` in a subprocess; ``new_session`` puts it in its own process group (fault injection
    kills that whole group, never the test)."""
    return subprocess.run([*PIPELINE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, start_new_session=new_session)


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The command failed as users should see it: exit code 2, no traceback, one ``error:`` line that
    contains every ``expected`` text. Returns that line."""
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]
