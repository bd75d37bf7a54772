"""A real S3 API on loopback: moto's server mode (`moto_server`) as a subprocess in its own process
group, stopped through its handle, with a bucket and the environment a client needs.

Every client (boto3, s3fs, pyarrow's S3FileSystem, MLflow's S3 artifact repository, Ray workers
started after the variables are set) finds the server through AWS_ENDPOINT_URL; the credentials are
dummies moto accepts.
"""
from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import requests

from tests.cluster_fixtures import VENV_BIN, _stop, free_port

REGION = "us-east-1"   # moto's default; buckets outside it need a LocationConstraint


@dataclass
class S3Server:
    endpoint: str                  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str] = field(default_factory=dict)   # what a client process needs
    proc: subprocess.Popen | None = None

    def url(self, *parts: str) -> str:
        """s3://<bucket>/<parts...>"""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket (boto3, paginated), sorted."""
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def last_modified(self, prefix: str = "") -> dict[str, float]:
        """{key: upload time (s)} under `prefix`."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.update({o["Key"]: o["LastModified"].timestamp() for o in page.get("Contents", [])})
        return out


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
            # no ~/.aws profile or EC2 metadata lookups (seconds of timeouts each)
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_server(tmp: Path, bucket: str = "ldmflow-test", timeout_s: float = 60) -> Iterator[S3Server]:
    """`moto_server` on 127.0.0.1 (a free port) with `bucket` created. Does not touch os.environ:
    use `s3_environ(server)` for this process, `server.env` for subprocesses."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(tmp / "moto.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = S3Server(endpoint=endpoint, bucket=bucket, env=s3_env(endpoint), proc=proc)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(tmp / 'moto.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{endpoint}/moto-api/", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError("moto_server did not come up")
            time.sleep(0.3)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        _stop(proc, grace_s=5)


@contextmanager
def s3_environ(server: S3Server) -> Iterator[None]:
    """`server.env` in os.environ for the block, then the previous values back. fsspec's cached
    s3fs instances are dropped on both sides so none keeps another endpoint."""
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _clear_fs_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fs_cache()


def _clear_fs_cache() -> None:
    try:
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
