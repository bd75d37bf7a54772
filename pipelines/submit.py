"""`ldmflow submit`: validate a pipeline here, run it on a Ray cluster as a Ray job.

What travels with the job: the resolved config (one YAML, every default filled in and checked
before anything is sent), its prompts file, and — with code="ship" — this checkout's `models`,
`pipelines` and `cluster` packages as runtime_env py_modules (code="image" relies on an image with
ldmflow installed, see infra/Dockerfile). The job's driver then runs `ldmflow run` joined to the
cluster (`--address auto`), so every stage's Ray Train workers and Ray Data actors spread over its
nodes. The output directory must be storage every node and a later job can see (an absolute
shared path or an object-store URL): resubmitting the same config resumes after its last finished
stage.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import yaml

from cluster.jobs import submit_job
from pipelines.config import ConfigError, load_config, to_dict

__all__ = ["submit_pipeline", "job_entrypoint"]

CONFIG_NAME = "pipeline.yaml"
# Credentials for an MLflow server with basic auth, forwarded when set here. (They are visible to
# whoever can read the job's runtime_env on the cluster, like any job env var.)
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL")


def job_entrypoint(config_name: str = CONFIG_NAME) -> str:
    return f"python -m pipelines.cli run {config_name} --address auto"


def _package_dirs() -> list[str]:
    import cluster
    import models
    import pipelines
    return [str(Path(m.__file__).parent) for m in (models, pipelines, cluster)]


def submit_pipeline(config: str | None, overrides: list[str], address: str, *, token: str | None = None,
                    code: str = "ship", tracking_uri: str | None = None,
                    submission_id: str | None = None) -> str:
    """Validate, stage and submit; returns the job's submission id."""
    cfg = load_config(config, overrides)
    from pipelines.run import preflight
    preflight(cfg)   # prompts file, font, shard URLs: fail here, not after the upload
    if not (cfg.output_dir.startswith("/") or "://" in cfg.output_dir):
        raise ConfigError(f"output_dir: a submitted pipeline needs storage every node and a resubmission "
                          f"can see (an absolute path on shared storage, or s3://...), got {cfg.output_dir!r}")
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    if cfg.tracking.uri is None:
        warnings.warn("tracking.uri is not set: the job will log to an embedded SQLite MLflow inside "
                      f"{cfg.output_dir} on the cluster; pass --tracking-uri to log to your MLflow server",
                      stacklevel=2)
    staging = Path(tempfile.mkdtemp(prefix="ldmflow-submit-"))
    try:
        data = to_dict(cfg)
        if cfg.sample.prompts:
            src = Path(cfg.sample.prompts)
            shutil.copy(src, staging / src.name)
            data["sample"]["prompts"] = src.name   # resolved against the job's working_dir
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        kwargs = {}
        if code == "ship":
            kwargs["py_modules"] = _package_dirs()
        elif code != "image":
            raise ValueError(f"code: expected 'ship' or 'image', got {code!r}")
        return submit_job(address, job_entrypoint(), working_dir=str(staging), env_vars=env, token=token,
                          submission_id=submission_id,
                          metadata={"ldmflow.pipeline": cfg.name, "ldmflow.output_dir": cfg.output_dir},
                          **kwargs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
