"""A real multi-node Ray cluster and an MLflow server on this machine, for submission tests.

Head and worker are separate `ray start --block` processes (own raylets, own temp dir, token auth
on), each in its own process group, and are stopped through those handles — never `ray stop`,
which would kill every Ray of this user on the machine (other tests', other sessions').
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group (`ray start --block` then stops what it started), SIGKILL after grace."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@dataclass
class RayCluster:
    dashboard: str                 # http://127.0.0.1:PORT (Jobs API)
    gcs_address: str               # for `ray start --address`
    token: str
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[dict]:
        r = requests.get(f"{self.dashboard}/api/v0/nodes", headers=self.headers(), timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]


def _env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "MLFLOW_DISABLE_TELEMETRY": "true",
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{env.get('PATH', '')}"})
    return env


def _node_ports(head: bool) -> list[str]:
    """Free ports for every listener a node opens whose default is fixed (the dashboard agent's
    52365, the Ray client server's 10001, ...): two nodes of this cluster, or any other Ray on the
    machine (a test session's own, a user's), would otherwise collide and a node's agent or the
    head's dashboard modules fail to start."""
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    if head:
        ports.append(f"--ray-client-server-port={free_port()}")
    return ports


@contextmanager
def ray_cluster(tmp: Path, head_cpus: int = 1, worker_cpus: int = 1, timeout_s: float = 120) -> Iterator[RayCluster]:
    """A head (dashboard on 127.0.0.1) plus one worker node, both with token auth."""
    token = secrets.token_hex(16)
    dash_port, gcs_port = free_port(), free_port()
    # A short temp dir: Ray puts AF_UNIX sockets under <temp>/session_<date>_<pid>/sockets/, and a
    # socket path over 107 bytes (pytest's tmp_path is long) makes the head's dashboard modules
    # (MetricsHead first) fail to start.
    temp_dir = Path(tempfile.mkdtemp(prefix="ldmr-", dir="/tmp"))
    env = _env(token)
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--num-cpus={head_cpus}", *common,
         *_node_ports(head=True)],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    cluster = RayCluster(dashboard=f"http://127.0.0.1:{dash_port}", gcs_address="", token=token,
                         temp_dir=temp_dir, procs=[head])
    try:
        deadline = time.time() + timeout_s
        while True:   # the dashboard answers once the head is up
            if head.poll() is not None:
                raise RuntimeError(f"ray head exited: {(tmp / 'head.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{cluster.dashboard}/api/version", headers=cluster.headers(), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError("ray head did not come up")
            time.sleep(1)
        while not cluster.alive_nodes():   # the state API lags the dashboard by a moment
            if time.time() > deadline:
                raise TimeoutError("ray head node never listed as alive")
            time.sleep(1)
        ip = cluster.alive_nodes()[0]["node_ip"]   # the GCS binds the node IP, not loopback
        cluster.gcs_address = f"{ip}:{gcs_port}"
        worker = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", f"--address={cluster.gcs_address}", f"--num-cpus={worker_cpus}",
             *common, *_node_ports(head=False)], env=env, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        cluster.procs.append(worker)
        while len(cluster.alive_nodes()) < 2:
            if worker.poll() is not None:
                raise RuntimeError(f"ray worker exited: {(tmp / 'worker.log').read_text()[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError("ray worker node did not join")
            time.sleep(1)
        yield cluster
    finally:
        for p in reversed(cluster.procs):
            _stop(p)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def mlflow_server(tmp: Path, timeout_s: float = 90, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1: SQLite backend, artifacts proxied through the server into
    `artifacts_destination` (default a local directory; s3://... with `env` holding the endpoint)."""
    port = free_port()
    root = tmp / "mlflow-server"
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", artifacts_destination or str(root / "artifacts"), "--serve-artifacts",
         "--workers", "1"],
        env={**_env(""), **(env or {})}, stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(tmp / 'mlflow.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError("mlflow server did not come up")
            time.sleep(1)
        yield url
    finally:
        _stop(proc, grace_s=10)
