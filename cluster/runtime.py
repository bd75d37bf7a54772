"""Starting or joining Ray for one pipeline run, and the environment every worker needs."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from cluster.prebuild import resolve_dir   # the default op cache is one directory per Python environment

__all__ = ["ray_session", "worker_env", "run_tasks", "quiet_local_ray_train"]

# Ray Train 2.60 starts a PlacementGroupCleaner beside every trainer. It asks the State API (served
# by the dashboard) once a second whether the controller lives, and without a dashboard it warns on
# every failed ask: 842 of 941 stderr lines of a quickstart run. The embedded Ray runs without a
# dashboard (10 more processes, ~0.9 GiB) and is shut down whole at the end, placement groups with it,
# so there the cleaner has nothing to do that shutdown does not.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_ray_train() -> None:
    """worker_process_setup_hook of the embedded Ray: the cleaner's warnings above, errors kept."""
    import logging
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def worker_env(torch_extensions_dir: str | None = None) -> dict[str, str]:
    """Environment variables for Ray workers: DeepSpeed's JIT ops cached across runs, MLflow quiet."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if torch_extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = resolve_dir(torch_extensions_dir)
    return env


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                env: dict[str, str] | None = None, log_to_driver: bool = True) -> Iterator[dict]:
    """Start a local Ray (address None) or join an existing cluster; shut down only what we started.

    Yields the cluster resources. An already-initialised Ray (a test fixture, a Ray job driver) is
    used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    runtime_env = {"env_vars": dict(env or {})}
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)   # the driver runs Ray Data operators in-process too
    if address is None:
        # address="local": always a new Ray of our own, even when another one runs on this machine.
        runtime_env["worker_process_setup_hook"] = quiet_local_ray_train
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=log_to_driver,
                 configure_logging=True, logging_level="WARNING")
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def run_tasks(fn, kwargs_list: list[dict], num_cpus: float = 1) -> list:
    """Run `fn(**kwargs)` for each kwargs as Ray tasks and return the results in order."""
    import ray

    from ray.exceptions import RayTaskError

    remote = ray.remote(num_cpus=num_cpus)(fn)
    try:
        return ray.get([remote.remote(**kw) for kw in kwargs_list])
    except RayTaskError as e:
        # The task's own exception (e.g. a ShardError naming the shard), not Ray's wrapper of it.
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise
