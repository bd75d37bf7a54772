"""MLflow tracking through an explicit client: every call names its run, so stages running in other
processes (Ray workers) log to the right place without global "active run" state.

Embedded default: a SQLite backend and a local artifact directory inside the run's output dir.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__ = ["Tracker", "MetricLogger", "TAG", "flatten"]

# Lineage tag names: one place, so stages and tests agree.
TAG = {
    "stage": "ldmflow.stage",
    "pipeline": "ldmflow.pipeline",
    "config_hash": "ldmflow.config_hash",
    "code_version": "ldmflow.code_version",
    "dataset_hash": "ldmflow.dataset_hash",
    "autoencoder_hash": "ldmflow.autoencoder_hash",
    "autoencoder_version": "ldmflow.autoencoder_model_version",
    "text_encoder_hash": "ldmflow.text_encoder_hash",
    "text_encoder_version": "ldmflow.text_encoder_model_version",
    "latent_cache_key": "ldmflow.latent_cache_key",
    "diffusion_hash": "ldmflow.diffusion_hash",
    "diffusion_version": "ldmflow.diffusion_model_version",
    "upstream_runs": "ldmflow.upstream_runs",
    "code_commit": "ldmflow.code_commit",     # git commit (lineage); the cache key uses code_hash
    "code_hash": "ldmflow.code_hash",         # hash of the source a stage runs (pipelines.lineage)
    "stage_key": "ldmflow.stage_key",         # the stage output's cache key (pipelines.run)
}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class Tracker:
    uri: str
    artifact_location: str
    experiment: str

    @classmethod
    def embedded(cls, output_dir: str | Path, uri: str | None, artifact_location: str | None,
                 experiment: str) -> "Tracker":
        out = Path(output_dir).resolve()
        remote = bool(uri) and uri.startswith(("http://", "https://", "databricks"))
        uri = uri or f"sqlite:///{out / 'mlflow.db'}"
        if artifact_location is None and not remote:
            artifact_location = (out / "mlartifacts").as_uri()
        # A tracking server decides its experiments' artifact location itself (with
        # --serve-artifacts: mlflow-artifacts:/, proxied through the server): "" leaves it to it.
        return cls(uri=uri, artifact_location=artifact_location or "", experiment=experiment)

    @property
    def client(self):
        if not hasattr(self, "_client"):
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location or None)

    def start_run(self, name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        # Strings only: a tracking server's REST store refuses other types (SQLite accepts them).
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        MetricLogger(self.uri, run_id).log(metrics, step)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def artifact_uri(self, run_id: str, path: str = "") -> str:
        base = self.client.get_run(run_id).info.artifact_uri
        return f"{base}/{path}" if path else base

    def register_model(self, name: str, run_id: str, artifact_path: str, aliases: list[str],
                       tags: dict[str, Any] | None = None, description: str = "") -> str:
        """A Model Registry version whose source is the run's artifact directory; returns the
        version number. Aliases move to the new version."""
        from mlflow.exceptions import MlflowException
        client = self.client
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        mv = client.create_model_version(name, source=self.artifact_uri(run_id, artifact_path),
                                         run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()},
                                         description=description)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)

    def ui_command(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri} in a browser"
        art = self.artifact_location
        return f"mlflow ui --backend-store-uri {self.uri} --default-artifact-root {art}"


class MetricLogger:
    """Batched metric logging from any process (rank 0 of a Ray Train worker group)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self._client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=uri)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        import time
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0)
                                                     for k, v in metrics.items()])
