"""Real I/O failures, not simulated ones: a full disk and a read-only store, on filesystems mounted by the
test itself inside its own user + mount namespace (``unshare -rm``; nothing outside it is touched).

The command must end with one line naming the path and the cause, exit code 2, and lose nothing: after
space is freed the same command completes the store, equal to one written without trouble.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import ENV

from cache_helpers import TINY_VIT, store_arrays, write_image_folder

IN_PROCESS = {"random_init": True, "min_tokens": 16, "max_tokens": 64, "shard_images": 2, "shard_rows": 32,
              "chunk_rows": 16, "pixel_shard_bytes": 16384, "pixel_chunk_bytes": 4096, "num_cpus": 2}
SETTINGS = ["--random-init", *sum((["--set", f"{k}={v}"] for k, v in IN_PROCESS.items() if k != "random_init"), [])]


def _namespace(script: str) -> subprocess.CompletedProcess:
    """Run a bash script as root of a fresh user + mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-rm", "bash", "-ec", script], capture_output=True, text=True, env=ENV,
                          timeout=900)


def _cache_cmd(images: Path, store: str, name: str = "vit") -> str:
    args = ["cache-teachers", str(images), "--store", store, "--teacher", TINY_VIT, "--name", name, *SETTINGS]
    return shlex.join([sys.executable, "-m", "pipeline.cli", *args])


@pytest.fixture(scope="module")
def images_and_reference(tmp_path_factory, ray_local):
    if shutil.which("unshare") is None or _namespace("true").returncode != 0:
        pytest.fail("these tests need `unshare -rm` (user and mount namespaces) to mount their own filesystems")
    from stages.cache import run_cache
    from stages.config import CacheConfig

    root = tmp_path_factory.mktemp("io")
    images = root / "images"
    write_image_folder(images)
    ref = root / "reference"  # written in-process, without trouble: the same code
    run_cache(str(images), str(ref), CacheConfig(teacher=TINY_VIT, name="vit", **IN_PROCESS))
    return images, ref


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_full_disk_is_one_line_and_a_rerun_after_freeing_space_completes(images_and_reference, tmp_path):
    images, ref = images_and_reference
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    small = max(64, _du(ref) // 1024 // 2)  # KiB: room for half the store
    script = f"""
mount -t tmpfs -o size={small}k tmpfs {disk}
set +e
{_cache_cmd(images, f"{disk}/store")} > {tmp_path}/full.out 2> {tmp_path}/full.err
echo $? > {tmp_path}/full.rc
set -e
mount -o remount,size=64m {disk}
{_cache_cmd(images, f"{disk}/store")} > {tmp_path}/again.out 2> {tmp_path}/again.err
cp -r {disk}/store {out}
"""
    proc = _namespace(script)
    err = (tmp_path / "full.err").read_text() if (tmp_path / "full.err").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + err + (tmp_path / "again.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(disk) in lines[0], err
    assert "Traceback" not in err
    a, b = store_arrays(str(ref)), store_arrays(str(out))
    assert a.keys() == b.keys()
    for key in a:
        if key != "images/source":  # the two stores list the same files
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_read_only_store_is_one_line_naming_it(images_and_reference, tmp_path):
    images, ref = images_and_reference
    store = tmp_path / "store"
    shutil.copytree(ref, store)
    script = f"""
mount --bind {store} {store}
mount -o remount,bind,ro {store}
set +e
{_cache_cmd(images, str(store), name="second")} > {tmp_path}/ro.out 2> {tmp_path}/ro.err
echo $? > {tmp_path}/ro.rc
"""
    proc = _namespace(script)
    err = (tmp_path / "ro.err").read_text()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ro.rc").read_text().strip() == "2", err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and str(store) in lines[0], err
    a, b = store_arrays(str(ref)), store_arrays(str(store))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_full_disk_while_training_is_one_line_and_the_rerun_matches_an_untroubled_run(images_and_reference,
                                                                                         tmp_path):
    """The first checkpoint does not fit: one line naming the run and the cause, exit 2; with room again the same
    command trains the run, its loss curve equal to a run written without trouble."""
    import json

    _, ref = images_and_reference
    disk = tmp_path / "disk"
    disk.mkdir()
    args = ["train", "--store", str(ref), "--model", "tiny", "--steps", "4", "--set", "data.seq_len=160",
            "--set", "data.seqs_per_batch=2", "--set", "data.workers=0", "--set", "run.checkpoint_every=2",
            "--set", "run.threads=1"]
    cmd = lambda out: shlex.join([sys.executable, "-m", "pipeline.cli", *args, "--out", out])  # noqa: E731
    script = f"""
{cmd(str(tmp_path / "whole"))} > /dev/null 2> {tmp_path}/whole.err
mount -t tmpfs -o size=256k tmpfs {disk}
set +e
{cmd(f"{disk}/run")} > {tmp_path}/full.out 2> {tmp_path}/full.err
echo $? > {tmp_path}/full.rc
set -e
mount -o remount,size=64m {disk}
{cmd(f"{disk}/run")} > {tmp_path}/again.out 2> {tmp_path}/again.err
cp {disk}/run/metrics.jsonl {tmp_path}/again.jsonl
"""
    proc = _namespace(script)
    err = (tmp_path / "full.err").read_text() if (tmp_path / "full.err").exists() else ""
    assert proc.returncode == 0, proc.stderr + err + ((tmp_path / "again.err").read_text()
                                                      if (tmp_path / "again.err").exists() else "")
    assert (tmp_path / "full.rc").read_text().strip() == "2", err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and f"{disk}/run" in lines[0], err
    assert "Traceback" not in err
    losses = lambda path: [json.loads(ln)["loss"] for ln in path.read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "again.jsonl") == losses(tmp_path / "whole" / "metrics.jsonl")
