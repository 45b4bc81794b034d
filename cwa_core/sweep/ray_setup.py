"""Ray for the sweep: start or join it (:func:`init_ray`) and the thin actor adapter
(:class:`_RayWorker`) that the runner wraps with ``ray.remote``."""
from __future__ import annotations

import logging
import os

from .worker import ModelWorker

# the sweep's log lines keep the runner's name wherever the code lives (logs and tests filter on it)
log = logging.getLogger("cwa_core.sweep.runner")


def init_ray(address: str | None, num_cpus: int | None = None, *, dashboard: bool = False):
    """Join ``address`` or start a local Ray that listens on the loopback address only.

    A local Ray starts without its dashboard unless asked (``dashboard=True``): on a small
    machine the dashboard's processes cost about a second of start-up and a few percent of
    every core for the whole sweep (measured: perturbation evaluations 10% slower with it,
    5% without; ``benchmarks/README.md``), and the sweep's own record is MLflow.
    """
    if not address:
        # On Linux this makes every Ray process (GCS, raylet, workers, dashboard) bind to
        # 127.0.0.1 instead of all interfaces. Ray reads it when first imported, so it is set
        # before the import; tests/test_sweep_ray.py checks the sockets.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray would start one idle Python worker per CPU as the driver connects; the sweep
        # starts its actors itself, and on a small machine those idle workers slow Ray's start
        # by about a second and keep polling for the whole sweep (measured in
        # benchmarks/README.md). Read by the raylet it starts; a user's own setting wins.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from ray._private import ray_constants

        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            # ray read the variable when first imported; if that was before we set it, say it again
            ray_constants.ENABLE_RAY_CLUSTER = False
        kw = {"num_cpus": num_cpus} if num_cpus else {}
        ctx = ray.init(log_to_driver=False, include_dashboard=dashboard, **kw)
        url = getattr(ctx, "dashboard_url", None)
        if url:
            log.info("Ray dashboard: http://%s", url)
    return ray


class _RayWorker(ModelWorker):
    """The thin Ray adapter: where the actor runs (for placement checks and the manifest)."""

    def info(self) -> dict:
        import ray

        out = super().info()
        ctx = ray.get_runtime_context()
        out.update({"node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]})
        return out
