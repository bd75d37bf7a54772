"""Submitting pipelines to a Ray cluster with the Ray Jobs API, token authentication kept on.

Ray 2.60 clusters require a bearer token on the dashboard's HTTP API (`RAY_AUTH_MODE=token`, the
default). The client here finds the token itself — `--token`, then `RAY_AUTH_TOKEN`, then the file
named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token` (Ray's own order and locations) — and
sends it as an explicit `Authorization: Bearer` header, so it works whatever this process's own
RAY_AUTH_MODE is. Every failure becomes a `JobsError` whose message says what to do.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["JobsError", "find_token", "jobs_client", "submit_job", "job_status", "job_logs", "stop_job",
           "wait_for_job", "TERMINAL"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# What Ray Jobs uploads with the working_dir: the code and configs, not runs, caches or the venv.
DEFAULT_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "**/__pycache__", "*.egg-info",
                    ".pytest_cache", "ray_results", "*.db"]


class JobsError(RuntimeError):
    """The cluster cannot be reached, refuses our token, or does not know the job."""


def find_token(token: str | None = None) -> str | None:
    """The Ray auth token: the argument, $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
        return p.read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


def _http_address(address: str) -> str:
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"address {address!r}: expected the dashboard's http://HOST:8265 (not ray:// or auto)")
    return address.rstrip("/")


def _call(address: str, fn: Callable[[], Any]):
    """Run a Jobs API call; turn Ray's and requests' exceptions into one-line JobsErrors."""
    from ray.exceptions import AuthenticationError
    try:
        return fn()
    except AuthenticationError as e:
        first = str(e).splitlines()[0]
        if "required" in first.lower() or "missing" in first.lower():
            raise JobsError(f"{address}: the cluster requires a Ray auth token and none was sent "
                            f"(pass --token, set RAY_AUTH_TOKEN, or put it in ~/.ray/auth_token)") from None
        raise JobsError(f"{address}: the cluster rejected the auth token ({first}); "
                        f"use the token the head node was started with") from None
    except ConnectionError as e:
        raise JobsError(f"{address}: cannot reach the Ray dashboard ({e}); is the head running and "
                        f"port 8265 reachable from here?") from None
    except RuntimeError as e:
        msg = str(e)
        if "404" in msg or "does not exist" in msg:
            raise JobsError(f"{address}: {msg.strip()}") from None
        raise


def jobs_client(address: str, token: str | None = None):
    """A JobSubmissionClient with our bearer token; checks the connection (and the token) now."""
    from ray.job_submission import JobSubmissionClient
    address = _http_address(address)
    tok = find_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    client = _call(address, lambda: JobSubmissionClient(address, headers=headers))
    # The version check in the constructor is not authenticated on every Ray; list_jobs is.
    _call(address, client.list_jobs)
    return client


def submit_job(address: str, entrypoint: str, *, working_dir: str | None = None,
               env_vars: dict[str, str] | None = None, token: str | None = None,
               submission_id: str | None = None, pip: list[str] | None = None,
               py_modules: list[str] | None = None,
               excludes: list[str] | None = None, entrypoint_num_cpus: float | None = None,
               metadata: dict[str, str] | None = None) -> str:
    """Submit `entrypoint` with the project as runtime_env working_dir (or none, for an image that
    has ldmflow installed). Returns the submission id."""
    client = jobs_client(address, token)
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars or {})}
    if working_dir:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = list(excludes or DEFAULT_EXCLUDES)
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    if pip:
        runtime_env["pip"] = list(pip)
    sid = submission_id or f"ldmflow-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return _call(address, lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                     submission_id=sid, metadata=metadata or {},
                                                     entrypoint_num_cpus=entrypoint_num_cpus))


def _info(client, address: str, job_id: str):
    try:
        return _call(address, lambda: client.get_job_info(job_id))
    except JobsError as e:
        raise JobsError(f"{address}: no job {job_id!r} on this cluster ({e})") from None


def job_status(address: str, job_id: str, token: str | None = None) -> dict[str, Any]:
    client = jobs_client(address, token)
    info = _info(client, address, job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata}


def job_logs(address: str, job_id: str, token: str | None = None, follow: bool = False) -> Iterator[str]:
    """The job's driver log: all of it, or (follow) streamed until the job ends."""
    client = jobs_client(address, token)
    _info(client, address, job_id)   # a clear error for an unknown id before any streaming
    if not follow:
        yield _call(address, lambda: client.get_job_logs(job_id))
        return
    agen = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                chunk = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop_job(address: str, job_id: str, token: str | None = None) -> bool:
    client = jobs_client(address, token)
    _info(client, address, job_id)
    return bool(_call(address, lambda: client.stop_job(job_id)))


def wait_for_job(address: str, job_id: str, token: str | None = None, timeout_s: float = 3600,
                 poll_s: float = 2.0) -> dict[str, Any]:
    """Poll until the job reaches a terminal status (or raise TimeoutError)."""
    client = jobs_client(address, token)
    deadline = time.time() + timeout_s
    while True:
        info = _info(client, address, job_id)
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        if status in TERMINAL:
            return {"job_id": job_id, "status": status, "message": info.message}
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
