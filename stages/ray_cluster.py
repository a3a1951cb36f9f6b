"""Start an embedded local Ray cluster for one command, or join an existing one (--ray-address)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

__all__ = ["ray_cluster"]


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of a command: started and stopped here unless it was already running."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = dict(
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        import torch

        # the GPUs torch sees, so that placement (stages.placement.cluster_gpus) and Ray agree
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # An embedded cluster serves this machine only, but Ray still resolves 127.0.0.1 to the machine's
        # interface address (services.resolve_ip_for_localhost) and listens on every interface, unless
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the environment before Ray is first imported (Ray reads
        # it once, at import; the tests set it in tests/conftest.py). It cannot be set here: by now Ray is
        # imported, and a command that joins a cluster (--ray-address) must not have it.
        # address="local": a new cluster even when another one runs on this machine; without it Ray joins the
        # latest cluster started here (RAY_ADDRESS, /tmp/ray/ray_current_cluster), someone else's job's
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=gpus, _node_ip_address="127.0.0.1",
                 **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
