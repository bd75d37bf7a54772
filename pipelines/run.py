"""The pipeline DAG: data -> autoencoder (+ clip text encoder) -> latent cache -> diffusion -> samples.

Stages hand their typed artifacts to each other explicitly. Each finished stage writes
`artifact.json` last; re-running the same config in the same output directory resumes after the
last finished stage. An output directory that holds another config's results is refused.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import PipelineConfig, config_hash, to_dict
from pipelines.lineage import code_version, read_artifact_json, write_artifact_json
from pipelines.stage import (AutoencoderArtifact, ClipArtifact, DatasetArtifact, DiffusionArtifact,
                             LatentCacheArtifact, SampleArtifact, StageContext)
from pipelines.tracking import TAG, Tracker

__all__ = ["run_pipeline", "OutputDirError", "PipelineResult", "preflight"]

MARKER = "pipeline.json"


class OutputDirError(RuntimeError):
    """The output directory holds results this run must not touch."""


@dataclass
class PipelineResult:
    output_dir: str
    pipeline_run_id: str
    tracker: Tracker
    data: DatasetArtifact
    autoencoder: AutoencoderArtifact | None = None
    clip: ClipArtifact | None = None
    cache: LatentCacheArtifact | None = None
    diffusion: DiffusionArtifact | None = None
    samples: SampleArtifact | None = None


def _say(msg: str) -> None:
    print(f"[ldmflow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _claim_output_dir(cfg: PipelineConfig, out: Path) -> bool:
    """Create or re-enter `out`. Returns True when resuming the same config's earlier run."""
    h = config_hash(cfg)
    marker = out / MARKER
    if marker.is_file():
        try:
            other = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise OutputDirError(f"{out}: {MARKER} is unreadable; this directory is not safe to reuse") from None
        if other.get("config_hash") != h:
            raise OutputDirError(
                f"output_dir {out} already holds the results of another run "
                f"(pipeline {other.get('name')!r}, config hash {other.get('config_hash')}; this config: {h}). "
                f"Nothing was changed. Choose another output_dir (e.g. output_dir=runs/new) or remove it.")
        return True
    if out.exists() and any(out.iterdir()):
        raise OutputDirError(f"output_dir {out} is not empty and holds no {MARKER}: it is not an ldmflow "
                             f"run directory. Nothing was changed. Choose an empty or new directory.")
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": cfg.name, "config_hash": h, "config": to_dict(cfg),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    tmp.replace(marker)
    return False


def preflight(cfg: PipelineConfig, with_samples: bool = True) -> None:
    """Checks that fail in seconds what would otherwise fail after minutes of training."""
    if with_samples:
        from pipelines.sample import read_prompts
        read_prompts(cfg.sample.prompts, cfg.sample.num_per_prompt, cfg.sample.seed)
    if cfg.data.source == "emoji":
        from pipelines.datasets.emoji import EmojiSource
        EmojiSource(resolution=cfg.data.resolution, seed=cfg.data.seed, font_path=cfg.data.font_path)
    if cfg.data.source == "shards":
        from pipelines.shards import expand_urls
        expand_urls(cfg.data.train_urls)
        if cfg.data.val_urls:
            expand_urls(cfg.data.val_urls)


def _context(cfg: PipelineConfig, out: Path, resumed: bool) -> StageContext:
    from cluster.runtime import worker_env
    tracker = Tracker.embedded(out, cfg.tracking.uri, cfg.tracking.artifact_location, cfg.tracking.experiment)
    version = code_version()
    run_id = tracker.start_run(cfg.name, tags={TAG["pipeline"]: cfg.name, TAG["config_hash"]: config_hash(cfg),
                                              TAG["code_version"]: version, "ldmflow.resumed": resumed})
    tracker.log_params(run_id, to_dict(cfg))
    tracker.log_dict(run_id, to_dict(cfg), "pipeline_config.json")
    return StageContext(config=cfg, output_dir=out, tracker=tracker, pipeline_run_id=run_id,
                        code_version=version, env=worker_env(cfg.cluster.torch_extensions_dir))


def _stage(ctx: StageContext, name: str, cls, fn):
    """Run a stage unless a finished artifact of this same config is already there."""
    done = read_artifact_json(ctx.output_dir / name)
    if done is not None:
        _say(f"{name}: reusing finished stage from {ctx.output_dir / name}")
        return cls(**done)
    t0 = time.time()
    _say(f"{name}: starting")
    art = fn()
    write_artifact_json(ctx.output_dir / name, art)
    _say(f"{name}: done in {time.time() - t0:.0f}s")
    return art


def run_pipeline(cfg: PipelineConfig, address: str | None = None, data_only: bool = False) -> PipelineResult:
    """Run the DAG (or only its data stage) for `cfg`; see the module docstring for resume rules."""
    from cluster.runtime import ray_session

    from cluster.runtime import worker_env

    preflight(cfg, with_samples=not data_only)
    out = Path(cfg.output_dir).resolve()
    # Reach Ray first: an unreachable cluster fails before anything is written.
    with ray_session(address or cfg.cluster.address, cfg.cluster.num_cpus,
                     worker_env(cfg.cluster.torch_extensions_dir)):
        resumed = _claim_output_dir(cfg, out)
        ctx = _context(cfg, out, resumed)
        return _run_stages(cfg, ctx, out, data_only)


def _run_stages(cfg: PipelineConfig, ctx: StageContext, out: Path, data_only: bool) -> PipelineResult:
    from pipelines.cache_latents import cache_latents
    from pipelines.data import prepare_data
    from pipelines.sample import sample
    from pipelines.train_autoencoder import train_autoencoder
    from pipelines.train_clip import train_clip
    from pipelines.train_diffusion import train_diffusion

    ok = False
    try:
        data = _stage(ctx, "data", DatasetArtifact, lambda: prepare_data(cfg.data, ctx))
        res = PipelineResult(str(out), ctx.pipeline_run_id, ctx.tracker, data)
        ctx.tracker.set_tags(ctx.pipeline_run_id, {TAG["dataset_hash"]: data.dataset_hash})
        if data_only:
            ok = True
            return res
        ae = _stage(ctx, "autoencoder", AutoencoderArtifact, lambda: train_autoencoder(cfg.autoencoder, data, ctx))
        clip = (_stage(ctx, "clip", ClipArtifact, lambda: train_clip(cfg.clip, data, ctx))
                if cfg.clip.enabled else None)
        cache = _stage(ctx, "cache", LatentCacheArtifact, lambda: cache_latents(cfg.cache, data, ae, ctx, clip))
        diff = _stage(ctx, "diffusion", DiffusionArtifact, lambda: train_diffusion(cfg.diffusion, cache, ctx))
        samples = _stage(ctx, "samples", SampleArtifact, lambda: sample(cfg.sample, diff, ae, cache, ctx))
        ctx.tracker.set_tags(ctx.pipeline_run_id, {
            TAG["autoencoder_version"]: ae.model_version or "", TAG["latent_cache_key"]: cache.key,
            TAG["diffusion_version"]: diff.model_version or ""})
        if samples.grid:
            ctx.tracker.log_artifact(ctx.pipeline_run_id, samples.grid, "images")
        res.autoencoder, res.clip, res.cache, res.diffusion, res.samples = ae, clip, cache, diff, samples
        ok = True
        return res
    finally:
        ctx.tracker.end_run(ctx.pipeline_run_id, ok=ok)
