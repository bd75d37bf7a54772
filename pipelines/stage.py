"""What stages hand each other: typed artifacts, and the context a stage runs in."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipelines.config import PipelineConfig, config_hash, to_dict
from pipelines.tracking import TAG, Tracker

__all__ = ["StageContext", "DatasetArtifact", "AutoencoderArtifact", "ClipArtifact", "LatentCacheArtifact",
           "DiffusionArtifact", "SampleArtifact", "BaselineArtifact",
           "EvaluationArtifact", "check_storage"]


@dataclass
class DatasetArtifact:
    train_urls: list[str]
    val_urls: list[str]
    num_train: int
    num_val: int
    dataset_hash: str          # content hash of train + val shards
    source: str
    run_id: str | None = None


@dataclass
class AutoencoderArtifact:
    directory: str             # model.safetensors + config.json (extra: scale_factor, ...)
    autoencoder_hash: str      # content hash of that directory
    scale_factor: float        # 1 / std of training latents; multiplies z before diffusion
    dataset_hash: str
    model_version: str | None  # Model Registry version, if registered
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClipArtifact:
    directory: str             # text_encoder/ (a TextEncoder dir) and clip/ (the whole CLIP)
    text_encoder_dir: str      # what the latent cache encodes captions with
    text_encoder_hash: str     # content hash of text_encoder/
    dataset_hash: str
    model_version: str | None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LatentCacheArtifact:
    directory: str
    key: str                   # hash of (autoencoder hash, scale, resolution, transforms, text encoder, data)
    train_urls: list[str]
    num_samples: int
    text_encoder_dir: str      # the exact text encoder that made the states (and must encode prompts)
    text_encoder_hash: str     # content hash of that directory (also part of `key`)
    null_text_file: str        # .npz with the empty caption's states and mask (classifier-free guidance)
    scale_factor: float        # per-tensor scale, measured by the autoencoder stage (also in latent_norm)
    latent_shape: list[int]    # (C, h, w)
    text_shape: list[int]      # (L, D)
    autoencoder_hash: str
    autoencoder_version: str | None
    dataset_hash: str
    run_id: str | None = None
    # models.latent_norm.LatentNorm.to_dict() of the autoencoder: what turns cached posterior samples
    # into diffusion latents (per-tensor scale or per-channel shift/scale). None = scale_factor alone.
    latent_norm: dict | None = None
    # With cache.root at a URL: where the cache lives (train_urls point there; `directory` is the
    # local copy of its small files: manifest, text encoder, null text).
    uri: str | None = None


@dataclass
class DiffusionArtifact:
    directory: str             # unet/ (+ unet_ema/) each model.safetensors + config.json; schedule.json
    diffusion_hash: str
    latent_cache_key: str
    model_version: str | None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SampleArtifact:
    directory: str
    manifest: str              # manifest.jsonl: one row per image
    grid: str | None
    num_images: int
    run_id: str | None = None
    pipeline_model_version: str | None = None   # the registered pyfunc (<prefix>-pipeline), if any


@dataclass
class BaselineArtifact:
    directory: str             # models.baselines.save_baseline: model.safetensors + config.json (family)
    family: str
    baseline_hash: str         # content hash of that directory
    dataset_hash: str
    model_version: str | None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)   # step, train_seconds, train/images_per_s


@dataclass
class EvaluationArtifact:
    directory: str             # metrics.json, samples (generate's output), sample grid
    model: str                 # what was scored: a baseline family or "ldm"
    model_hash: str            # content hash of the scored model
    dataset_hash: str
    metrics: dict[str, float | str] = field(default_factory=dict)   # "n/a" where a metric does not apply
    run_id: str | None = None


@dataclass
class StageContext:
    """Where a stage writes and logs. Stages get everything else as explicit arguments."""
    config: PipelineConfig
    output_dir: Path
    tracker: Tracker
    pipeline_run_id: str
    code_version: str
    env: dict[str, str]
    # Set by the pipeline runner (pipelines/run.py) per stage: where a stage's outputs go (its
    # cache-key directory, by stage and run name) and where Ray Train keeps its checkpoints.
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    ray_dir: Path | None = None

    def train(self, loop, loop_cfg: dict, num_workers: int, name: str, **fit_kwargs):
        """Run a per-worker loop under Ray Train with this run's storage, GPU setting and worker env
        (`fit_kwargs`: cluster.train.fit's max_failures, num_to_keep).
        Returns (ray.train Result, its numeric metrics)."""
        from cluster.storage import check_location
        from cluster.train import fit
        storage = str(self.ray_storage)
        check_location(storage, "cluster.storage_uri")   # a missing bucket fails before any worker starts
        result = fit(loop, loop_cfg, num_workers=num_workers, use_gpu=self.config.cluster.use_gpu,
                     storage_path=storage, name=name, env=self.env, **fit_kwargs)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        return result, metrics

    @property
    def ray_storage(self) -> Path | str:
        """Where Ray Train persists this stage's checkpoints (one subdirectory per run name): a local
        directory, or with cluster.storage_uri a location under that URL (a str).

        The remote location is recorded in the local directory (STORAGE_POINTER), so it stays this
        output dir's own: a resubmitted or re-entered stage finds its checkpoints again, and a forced
        rerun, whose runner removes the local directory, starts at a fresh location instead of
        resuming the finished run."""
        local = self.ray_dir or self.output_dir / "ray_results"
        uri = self.config.cluster.storage_uri
        if uri is None:
            return local
        pointer = local / STORAGE_POINTER
        if pointer.is_file():
            recorded = pointer.read_text().strip()
            if recorded.startswith(uri.rstrip("/") + "/"):   # else storage_uri changed: a new location
                return recorded
        from cluster.storage import join
        location = join(uri, f"{self.config.name}-{local.name}-{uuid.uuid4().hex[:12]}")
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{STORAGE_POINTER}.{os.getpid()}"
        tmp.write_text(location + "\n")
        os.replace(tmp, pointer)
        return location

    @staticmethod
    def fresh_dir(path: Path) -> Path:
        """`path`, emptied: a re-run replaces a stage's model directory whole."""
        if path.exists():
            shutil.rmtree(path)
        return path

    def stage_dir(self, name: str) -> Path:
        d = self.stage_dirs.get(name, self.output_dir / name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def stage_run(self, name: str, section: Any, tags: dict[str, Any] | None = None) -> Iterator[str]:
        """A nested MLflow run for one stage: its resolved config saved beside its outputs and
        logged; the run is marked FAILED if the stage raises."""
        cfg_dict = to_dict(section)
        all_tags = {TAG["stage"]: name, TAG["pipeline"]: self.config.name,
                    TAG["config_hash"]: config_hash(section), TAG["code_version"]: self.code_version}
        all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
        check_storage(self.config)   # seconds, not a training run, to learn a bucket is missing
        run_id = self.tracker.start_run(name, parent_run_id=self.pipeline_run_id, tags=all_tags)
        stage_dir = self.stage_dir(name)
        (stage_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
        self.tracker.log_params(run_id, cfg_dict)
        self.tracker.log_dict(run_id, cfg_dict, "config.json")
        ok = False
        try:
            yield run_id
            ok = True
        finally:
            self.tracker.end_run(run_id, ok=ok)


# The file in a stage's local Ray directory that names its checkpoint location under cluster.storage_uri.
STORAGE_POINTER = "storage_uri.txt"


def check_storage(config: PipelineConfig) -> None:
    """Every storage URL the pipeline writes to is reachable (its bucket exists); a
    cluster.storage.StorageError names the config field and the bucket otherwise. Local paths pass."""
    from cluster.storage import check_location
    check_location(config.cache.root, "cache.root")
    check_location(config.cluster.storage_uri, "cluster.storage_uri")
    check_location(config.tracking.artifact_location, "tracking.artifact_location")
