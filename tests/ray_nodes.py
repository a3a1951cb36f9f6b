"""A multi-node Ray cluster on this machine, every node on 127.0.0.1, for the cluster tests.

Why not ``ray start``: the CLI rewrites a node address of 127.0.0.1 to the machine's other interface
(``resolve_ip_for_localhost``), and refuses worker nodes when told to stay on loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``)
starts the same processes (a GCS, and one raylet per node with its own workers, object store and
resources) without that rewrite. It runs in a child process of the test (``python tests/ray_nodes.py``),
so the test's own Ray is untouched; the child prints the address and every node's raylet PID (a test
kills a node by killing its raylet) and keeps the cluster up until its stdin closes.

Drivers join with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in their environment (``LOOPBACK_ENV``): Ray
then resolves "this machine" to 127.0.0.1 rather than to the machine's interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Iterator

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def ray_nodes(nodes: list[dict], head_cpus: int = 0, system_config: dict | None = None) -> Iterator[dict]:
    """A cluster of a head (``head_cpus`` CPUs: 0 keeps work off it) and one worker node per entry of ``nodes``
    (``{"num_cpus": 1, "resources": {...}}``). Yields ``{"address", "nodes": [{"node_id", "raylet_pid"}, ...]}``
    (workers only, in the given order) and stops the cluster on exit. ``system_config``: Ray's own settings
    for the head (e.g. how fast a dead node is noticed)."""
    env = {**os.environ, **LOOPBACK_ENV}
    proc = subprocess.Popen([sys.executable, __file__, json.dumps({"head_cpus": head_cpus, "nodes": nodes,
                                                          "system_config": system_config or {}})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the Ray test cluster did not start")
        yield json.loads(line)
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
            proc.wait(timeout=60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _serve(spec: dict) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": spec["head_cpus"], "include_dashboard": False,
                                                            "_system_config": spec["system_config"]})
    workers = [cluster.add_node(num_cpus=n.get("num_cpus", 1), resources=n.get("resources", {}))
               for n in spec["nodes"]]
    cluster.wait_for_nodes()
    info = {"address": cluster.address,
            "nodes": [{"node_id": w.node_id, "raylet_pid": w.all_processes["raylet"][0].process.pid} for w in workers]}
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # until the test closes it
    cluster.shutdown()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
