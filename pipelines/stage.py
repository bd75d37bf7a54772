"""What stages hand each other: typed artifacts, and the context a stage runs in."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipelines.config import PipelineConfig, config_hash, to_dict
from pipelines.tracking import TAG, Tracker

__all__ = ["StageContext", "DatasetArtifact", "AutoencoderArtifact", "ClipArtifact", "LatentCacheArtifact",
           "DiffusionArtifact", "SampleArtifact"]


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
        from cluster.train import fit
        result = fit(loop, loop_cfg, num_workers=num_workers, use_gpu=self.config.cluster.use_gpu,
                     storage_path=str(self.ray_storage), name=name, env=self.env, **fit_kwargs)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        return result, metrics

    @property
    def ray_storage(self) -> Path:
        """Where Ray Train persists this run's checkpoints (one subdirectory per run name)."""
        return self.ray_dir or self.output_dir / "ray_results"

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
