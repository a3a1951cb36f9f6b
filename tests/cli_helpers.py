"""Running the `pipeline` command as a user does, and checking how it fails.

A run that is killed on purpose (``new_session``) or needs its own environment (``env``) is a subprocess.
Every other run goes through the same Typer app in this process (``in_process``), joined to the tests'
one Ray cluster: a subprocess would spend ~4 s importing torch and timm and ~5 s starting and stopping
its own Ray, which over the suite's CLI runs is minutes, and what those tests prove is the command's
behaviour (its output, exit code and files), which the app gives alike in either place.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import traceback

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def shared_ray() -> None:
    """The tests' one embedded Ray cluster (2 CPUs, loopback), started on first use and stopped at exit;
    ``stages.ray_cluster`` joins it instead of starting another."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for Ray's workers, as the subprocess runs have it
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    atexit.register(ray.shutdown)


def in_process(*args: str) -> subprocess.CompletedProcess:
    """``pipeline ARGS`` through the Typer app in this process: its exit code and its stdout and stderr apart.

    An exception that escapes the command is what the subprocess would print as a traceback and exit 1."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    shared_ray()
    args = [str(a) for a in args]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["pipeline", *args], code, result.stdout, stderr)


def run_pipeline(*args: str, env: dict | None = None, timeout: float = 600, new_session: bool = False,
                 alone: bool = False) -> subprocess.CompletedProcess:
    """``pipeline ARGS``: in this process unless it needs its own environment (``env``), may be killed
    (``new_session`` puts it in its own process group: fault injection kills that whole group, never the test)
    or must run as a command on its own, without the tests' Ray cluster (``alone``)."""
    if env is None and not new_session and not alone:
        return in_process(*args)
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
