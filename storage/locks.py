"""Writer locks: one writer at a time for a store's images, a teacher group, or a run directory.

A lock is a small JSON object created only if absent (``O_EXCL`` on a local disk; a conditional
"create" put on object stores whose fsspec driver supports it), holding who took it: host, pid,
process start time, command. A second writer is refused with a message naming the holder. A lock
whose holder is gone (same host, process no longer running: a SIGKILLed command) is stale and is
taken over, so a crash never blocks the rerun that repairs it. A holder on another host cannot be
checked from here; the message says which file to remove once that writer is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["LockError", "WriterLock"]


class LockError(RuntimeError):
    """Another live writer holds the lock."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (jiffies since boot), to tell a reused pid apart; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(pid)
    return started is None or holder.get("started") in (None, started)


class WriterLock:
    """``with WriterLock(fs, path, what):`` holds ``path`` for the block; ``what`` names it in messages."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, what: str):
        self.fs, self.path, self.what = fs, path, what
        self.held = False

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                           "time": time.time(), "command": " ".join(sys.argv)[:500]}).encode()

    def _create(self) -> bool:
        """Create the lock object if absent; False when it exists."""
        parent = self.path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        try:
            self.fs.pipe_file(self.path, self._record(), mode="create")
        except FileExistsError:
            return False
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # torn or unreadable: treated as held by an unknown writer

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our two calls
            if holder.get("host") == socket.gethostname() and not _alive(holder):
                self.fs.rm(self.path)  # stale: its writer died (kill -9, power loss); take over
                continue
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))}") if holder else "an unknown writer"
            raise LockError(f"{self.what} is being written by another process ({who}); wait for it to finish, "
                            f"or remove {self.path} if that process is dead")
        raise LockError(f"could not take the lock {self.path} for {self.what}")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
