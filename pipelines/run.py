"""The pipeline DAG: data -> autoencoder (+ clip text encoder) -> latent cache -> diffusion -> samples.

Stages hand their typed artifacts to each other explicitly. Each stage's output is cached under a
key: a content hash of (the resolved config the stage reads, the content identities of its inputs
— dataset hash, autoencoder hash, text encoder hash, latent cache key, diffusion hash — the hash of
the code it runs (`pipelines.lineage.stage_code_hash`), and files outside the pipeline it reads,
e.g. the prompts file). `run_pipeline` skips a stage whose key has a finished output, reruns a stale
one, and `force` reruns named stages (and, through the DAG, their dependents) on purpose. Because a
downstream key holds its inputs' *content* hashes, a rerun that reproduces the same bytes (the data
stage after a code change that did not alter the shards) leaves everything downstream up to date.

Output directory layout::

    pipeline.json                     marks an ldmflow run dir: pipeline name, latest config
    stages/<stage>/<key>/             one key's output (what the stage sees as its stage dir);
                                      artifact.json in it is written when the stage finished
    stages/<stage>/<key>.json         the key's record, written last (atomically): its presence
                                      is the cache hit; a forced rerun writes <key>-f<run>/ and
                                      moves the record only once that is complete
    <stage> -> stages/<stage>/<dir>   symlink to the stage's current output (moved atomically)
    ray_results/<stage>-<code hash>/  Ray Train checkpoints: a crashed training stage resumes
                                      from them under the same code, never across a code change
    latents/<cache key>/              the latent cache (content-keyed by pipelines.cache_latents)

Finished outputs are never written to again, so a config switched back and forth hits the cache
both ways; an interrupted attempt (no record) is continued in place by the next run of its key.
An output directory may hold successive configs of the same pipeline (`name`); one holding another
pipeline's results, or anything that is not an ldmflow run directory, is refused untouched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines.config import ConfigError, PipelineConfig, config_hash, to_dict
from pipelines.lineage import (code_commit, code_version, file_sha256, stage_code_hash, stage_key,
                               write_artifact_json)
from pipelines.stage import (AutoencoderArtifact, ClipArtifact, DatasetArtifact, DiffusionArtifact,
                             LatentCacheArtifact, SampleArtifact, StageContext)
from pipelines.tracking import TAG, Tracker, flatten

__all__ = ["run_pipeline", "OutputDirError", "PipelineResult", "preflight", "STAGES", "StageSpec",
           "stage_dependents", "MARKER"]

MARKER = "pipeline.json"
STAGES_DIR = "stages"
RECORD_FORMAT = 1


class OutputDirError(RuntimeError):
    """The output directory holds results this run must not touch."""


@dataclass(frozen=True)
class StageSpec:
    """One node of the DAG. `run(cfg, ctx, inputs)` calls the stage function with its upstream
    artifacts ({stage name: artifact}); `identity` is the artifact field downstream keys use."""
    name: str                  # output directory, --force name, key of PipelineResult.stages
    run_name: str              # the stage's MLflow run name and TAG["stage"] value
    module: str                # the code it runs (hashed into the key)
    artifact: type
    inputs: tuple[str, ...]    # upstream stages (an input that is disabled, clip, is left out)
    identity: str | None       # content identity for downstream keys (None: nothing downstream)
    run: Callable[[PipelineConfig, StageContext, dict], Any]


def _run_data(cfg, ctx, a):
    from pipelines.data import prepare_data
    return prepare_data(cfg.data, ctx)


def _run_autoencoder(cfg, ctx, a):
    from pipelines.train_autoencoder import train_autoencoder
    return train_autoencoder(cfg.autoencoder, a["data"], ctx)


def _run_clip(cfg, ctx, a):
    from pipelines.train_clip import train_clip
    return train_clip(cfg.clip, a["data"], ctx)


def _run_cache(cfg, ctx, a):
    from pipelines.cache_latents import cache_latents
    return cache_latents(cfg.cache, a["data"], a["autoencoder"], ctx, a.get("clip"))


def _run_diffusion(cfg, ctx, a):
    from pipelines.train_diffusion import train_diffusion
    return train_diffusion(cfg.diffusion, a["cache"], ctx)


def _run_samples(cfg, ctx, a):
    from pipelines.sample import sample
    art = sample(cfg.sample, a["diffusion"], a["autoencoder"], a["cache"], ctx)
    if cfg.tracking.register_models:
        # The whole text -> image pipeline as one MLflow pyfunc model (text encoder, U-Net,
        # autoencoder, sampler settings), logged on the sample run: part of this stage, so a cached
        # rerun registers no duplicate version.
        from pipelines.pyfunc import log_pipeline_model
        art.pipeline_model_version = log_pipeline_model(
            ctx.tracker, art.run_id, a["diffusion"], a["autoencoder"], a["cache"], cfg.sample,
            f"{cfg.tracking.model_prefix}-pipeline", aliases=[cfg.name])
    return art


# In run order (a topological order of the DAG).
STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("data", "data", "pipelines.data", DatasetArtifact, (), "dataset_hash", _run_data),
    StageSpec("autoencoder", "autoencoder", "pipelines.train_autoencoder", AutoencoderArtifact, ("data",),
              "autoencoder_hash", _run_autoencoder),
    StageSpec("clip", "clip", "pipelines.train_clip", ClipArtifact, ("data",), "text_encoder_hash", _run_clip),
    StageSpec("cache", "cache", "pipelines.cache_latents", LatentCacheArtifact, ("data", "autoencoder", "clip"),
              "key", _run_cache),
    StageSpec("diffusion", "diffusion", "pipelines.train_diffusion", DiffusionArtifact, ("cache",),
              "diffusion_hash", _run_diffusion),
    StageSpec("samples", "sample", "pipelines.sample", SampleArtifact, ("diffusion", "autoencoder", "cache"),
              None, _run_samples),
)}


def stage_dependents(names: Iterable[str]) -> set[str]:
    """`names` and every stage downstream of them."""
    out = set(names)
    for spec in STAGES.values():            # topological order: one pass suffices
        if out & set(spec.inputs):
            out.add(spec.name)
    return out


def _stage_config(cfg: PipelineConfig, name: str) -> dict:
    """The resolved config a stage reads (its section, plus what it reads from other sections), and
    where its lineage is recorded: results logged to another tracking store are not reused."""
    extra = {"clip": {"text_encoder": to_dict(cfg.cache.text_encoder), "resolution": cfg.data.resolution},
             "cache": {"resolution": cfg.data.resolution}}.get(name, {})
    section = {"samples": "sample"}.get(name, name)
    t = cfg.tracking
    return {section: to_dict(getattr(cfg, section)), **extra,
            "tracking": {"uri": t.uri, "register_models": t.register_models, "model_prefix": t.model_prefix}}


def _file_identity(path: str) -> dict:
    """Cheap identity of a local file a stage reads (size + mtime): hashing shard sets to compute a
    key would cost as much as the data stage itself. Remote URLs: the URL only."""
    p = Path(path).expanduser()
    if "://" in path or not p.exists():
        return {"path": path}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _external_inputs(cfg: PipelineConfig, name: str) -> dict:
    if name == "samples" and cfg.sample.prompts:
        return {"prompts_sha256": file_sha256(cfg.sample.prompts)}   # small; content decides the images
    if name == "autoencoder" and cfg.autoencoder.init_weights:
        # The starting weights decide the model as much as the config: their files' identities.
        d = Path(cfg.autoencoder.init_weights).expanduser()
        files = sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else [d]
        return {"init_weights": [_file_identity(str(p)) for p in files]}
    if name == "data":
        d = cfg.data
        if d.source == "shards":
            from pipelines.shards import expand_urls
            urls = expand_urls(d.train_urls) + (expand_urls(d.val_urls) if d.val_urls else [])
            return {"shards": [_file_identity(u) for u in urls]}
        if d.source == "emoji":
            from pipelines.datasets.emoji import EmojiSource
            font = getattr(EmojiSource(resolution=d.resolution, seed=d.seed, font_path=d.font_path),
                           "font_path", d.font_path)
            return {"font": _file_identity(str(font))} if font else {}
    return {}


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
    # {stage: {"status": "cached" | "ran" | "forced", "key", "dir", "run_id", "reason"}}
    stages: dict[str, dict] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[ldmflow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _claim_output_dir(cfg: PipelineConfig, out: Path) -> bool:
    """Create or re-enter `out`. Returns True when re-entering an earlier run of this pipeline
    (same or changed config: the stage keys decide what is reused)."""
    h = config_hash(cfg)
    marker = out / MARKER
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {"name": cfg.name, "config_hash": h, "config": to_dict(cfg), "created": now, "updated": now}
    if marker.is_file():
        try:
            other = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise OutputDirError(f"{out}: {MARKER} is unreadable; this directory is not safe to reuse") from None
        if other.get("name") != cfg.name:
            raise OutputDirError(
                f"output_dir {out} already holds the results of another pipeline ({other.get('name')!r}; "
                f"this one is {cfg.name!r}). Nothing was changed. Choose another output_dir "
                f"(e.g. output_dir=runs/new) or remove it.")
        record["created"] = other.get("created", now)
        _write_json_atomic(marker, record)
        return True
    if out.exists() and any(out.iterdir()):
        raise OutputDirError(f"output_dir {out} is not empty and holds no {MARKER}: it is not an ldmflow "
                             f"run directory. Nothing was changed. Choose an empty or new directory.")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(marker, record)
    return False


def preflight(cfg: PipelineConfig, with_samples: bool = True) -> None:
    """Checks that fail in seconds what would otherwise fail after minutes of training."""
    from pipelines.stage import check_storage
    check_storage(cfg)   # object-store locations (cache.root, cluster.storage_uri, ...) exist
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


def _check_force(cfg: PipelineConfig, force: Iterable[str], data_only: bool) -> set[str]:
    force = set(force)
    for name in sorted(force):
        if name not in STAGES:
            raise ConfigError(f"--force: unknown stage {name!r} (stages: {', '.join(STAGES)})")
        if name == "clip" and not cfg.clip.enabled:
            raise ConfigError("--force: stage 'clip' is disabled in this config (clip.enabled: false)")
        if data_only and name != "data":
            raise ConfigError(f"--force: only the data stage runs here, got {name!r}")
    return stage_dependents(force)


def _context(cfg: PipelineConfig, out: Path, resumed: bool) -> StageContext:
    from cluster.runtime import worker_env
    tracker = Tracker.embedded(out, cfg.tracking.uri, cfg.tracking.artifact_location, cfg.tracking.experiment)
    version = code_version()
    run_id = tracker.start_run(cfg.name, tags={TAG["pipeline"]: cfg.name, TAG["config_hash"]: config_hash(cfg),
                                              TAG["code_version"]: version, TAG["code_commit"]: code_commit() or "",
                                              "ldmflow.resumed": resumed})
    tracker.log_params(run_id, to_dict(cfg))
    tracker.log_dict(run_id, to_dict(cfg), "pipeline_config.json")
    return StageContext(config=cfg, output_dir=out, tracker=tracker, pipeline_run_id=run_id,
                        code_version=version, env=worker_env(cfg.cluster.torch_extensions_dir))


# ----------------------------------------------------------------------------------------------
# one stage: cache lookup, (re)run, record

def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if rec.get("format") != RECORD_FORMAT or not (Path(rec["dir"]) / "artifact.json").is_file():
        return None    # an output that was deleted by hand is a miss, not a broken hit
    return rec


def _current_record(out: Path, name: str) -> dict | None:
    """The record of the output `out/<name>` points at (what the previous run used)."""
    link = out / name
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link)).name
    return _read_record(out / STAGES_DIR / name / f"{target.split('-f')[0]}.json")


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        fo, fn = flatten(old), flatten(new)
        return [f"{path}{k}: {fo.get(k, '-')} -> {fn.get(k, '-')}" for k in sorted(set(fo) | set(fn))
                if fo.get(k) != fn.get(k)]
    return [] if old == new else [f"{path.rstrip('.')}: {old} -> {new}"]


def _why_stale(prev: dict | None, parts: dict) -> str:
    if prev is None:
        return "no cached output"
    old = prev["key_parts"]
    reasons = []
    changed = _diff(old.get("config"), parts["config"])
    if changed:
        reasons.append("config changed (" + "; ".join(changed[:3]) + (", ..." if len(changed) > 3 else "") + ")")
    inputs = [k for k in sorted(set(old.get("inputs", {})) | set(parts["inputs"]))
              if old.get("inputs", {}).get(k) != parts["inputs"].get(k)]
    if inputs:
        reasons.append("input changed (" + ", ".join(inputs) + ")")
    if old.get("code") != parts["code"]:
        reasons.append("code changed")
    if old.get("external") != parts["external"]:
        reasons.append("external input changed (" + ", ".join(
            k for k in sorted(set(old.get("external", {})) | set(parts["external"]))
            if old.get("external", {}).get(k) != parts["external"].get(k)) + ")")
    if old.get("format") != parts["format"]:
        reasons.append("key format changed")
    return "; ".join(reasons) or "no cached output for this key"


def _point_current(out: Path, name: str, target: Path) -> None:
    """Move the `out/<name>` symlink to `target`, atomically (a reader sees the old or the new)."""
    link = out / name
    if link.exists() and not link.is_symlink():
        # A stage directory from before stage caching: keep it, out of the way.
        link.rename(out / STAGES_DIR / name / f"legacy-{time.strftime('%Y%m%d-%H%M%S')}")
    tmp = out / f".{name}.link{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(os.path.relpath(target, out), tmp)
    os.replace(tmp, link)


def _set_aside_latents(prev: dict | None) -> tuple[Path, Path] | None:
    """Forcing the cache stage: its latents are content-keyed by cache_latents (reused whenever their
    directory exists), so move the current one aside for the rebuild; put back if that fails."""
    if prev is None:
        return None
    d = Path(prev["artifact"]["directory"])
    if not d.is_dir():
        return None
    aside = d.with_name(f".{d.name}.superseded-{os.getpid()}")
    d.rename(aside)
    return d, aside


def _stage(ctx: StageContext, spec: StageSpec, arts: dict, forced: bool, specs: dict | None = None,
           stage_config: dict | None = None) -> tuple[Any, dict]:
    """One stage through the cache. `specs`: the DAG its inputs come from (default STAGES; `ldmflow
    compare` adds per-family stages); `stage_config`: the resolved config it reads, when it is not
    a section of its own (default _stage_config)."""
    cfg, out = ctx.config, ctx.output_dir
    name = spec.name
    specs = specs or STAGES
    inputs = {n: getattr(arts[n], specs[n].identity) for n in spec.inputs if arts.get(n) is not None}
    code = stage_code_hash(spec.module)
    config = stage_config if stage_config is not None else _stage_config(cfg, name)
    key, parts = stage_key(name, config, inputs, code, _external_inputs(cfg, name))
    root = out / STAGES_DIR / name
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / f"{key}.json"
    rec = _read_record(record_path)
    if rec is not None and not forced:
        _point_current(out, name, Path(rec["dir"]))
        _say(f"{name}: up to date (key {key}), reusing finished stage from {rec['dir']}")
        return spec.artifact(**rec["artifact"]), {"status": "cached", "key": key, "dir": rec["dir"],
                                                  "run_id": rec.get("run_id"), "reason": "",
                                                  "seconds": rec.get("seconds")}
    reason = "forced (--force)" if forced else _why_stale(_current_record(out, name), parts)
    # A forced rerun builds beside the finished output of its key, which stays the cache hit until
    # the replacement is complete; otherwise an interrupted attempt of this key continues in place.
    attempt = root / (f"{key}-f{ctx.pipeline_run_id[:8]}" if forced else key)
    attempt.mkdir(parents=True, exist_ok=True)
    (attempt / "artifact.json").unlink(missing_ok=True)
    ray_dir = out / "ray_results" / f"{name}-{code}"
    if forced and ray_dir.exists():
        shutil.rmtree(ray_dir)   # train from scratch, not from the last run's final checkpoint
    latents = _set_aside_latents(rec) if forced and name == "cache" else None
    sctx = dataclasses.replace(ctx, stage_dirs={name: attempt, spec.run_name: attempt}, ray_dir=ray_dir)
    t0 = time.time()
    _say(f"{name}: {reason}; running (key {key})")
    try:
        art = spec.run(cfg, sctx, arts)
    except BaseException:
        if latents is not None and not latents[0].exists():
            latents[1].rename(latents[0])
        raise
    if latents is not None:
        shutil.rmtree(latents[1], ignore_errors=True)
    write_artifact_json(attempt, art)
    if art.run_id:
        ctx.tracker.set_tags(art.run_id, {TAG["stage_key"]: key, TAG["code_hash"]: code,
                                          TAG["code_commit"]: code_commit() or ""})
    _write_json_atomic(record_path, {"format": RECORD_FORMAT, "stage": name, "key": key, "key_parts": parts,
                                     "dir": str(attempt), "artifact": dataclasses.asdict(art),
                                     "run_id": art.run_id, "pipeline_run_id": ctx.pipeline_run_id,
                                     "code_version": ctx.code_version, "seconds": time.time() - t0,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _point_current(out, name, attempt)
    _say(f"{name}: done in {time.time() - t0:.0f}s (key {key})")
    return art, {"status": "forced" if forced else "ran", "key": key, "dir": str(attempt),
                 "run_id": art.run_id, "reason": reason, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------
# the pipeline

def run_pipeline(cfg: PipelineConfig, address: str | None = None, data_only: bool = False,
                 force: Iterable[str] = ()) -> PipelineResult:
    """Run the DAG (or only its data stage) for `cfg`, reusing every stage whose cached output is up
    to date; `force`: stage names to rerun anyway (their dependents rerun too). See the module
    docstring for keys and layout."""
    from cluster.runtime import ray_session, worker_env

    preflight(cfg, with_samples=not data_only)
    forced = _check_force(cfg, force, data_only)
    out = Path(cfg.output_dir).resolve()
    # Reach Ray first: an unreachable cluster fails before anything is written.
    with ray_session(address or cfg.cluster.address, cfg.cluster.num_cpus,
                     worker_env(cfg.cluster.torch_extensions_dir)):
        resumed = _claim_output_dir(cfg, out)
        ctx = _context(cfg, out, resumed)
        return run_stages(ctx, data_only, forced)


def run_stages(ctx: StageContext, data_only: bool = False, forced: Iterable[str] = ()) -> PipelineResult:
    """The stages in order under an open pipeline run (`ctx`); ends that run. Separate from
    run_pipeline so the caching logic can be exercised without Ray (tests substitute STAGES)."""
    cfg, out, forced = ctx.config, ctx.output_dir, set(forced)
    names = ["data"] if data_only else [n for n in STAGES if n != "clip" or cfg.clip.enabled]
    arts: dict[str, Any] = {}
    info: dict[str, dict] = {}
    ok = False
    try:
        for name in names:
            arts[name], info[name] = _stage(ctx, STAGES[name], arts, name in forced)
            if name == "data":
                ctx.tracker.set_tags(ctx.pipeline_run_id, {TAG["dataset_hash"]: arts["data"].dataset_hash})
        res = PipelineResult(str(out), ctx.pipeline_run_id, ctx.tracker, stages=info, **arts)
        ctx.tracker.set_tags(ctx.pipeline_run_id, {f"{TAG['stage_key']}.{n}": i["key"] for n, i in info.items()})
        ctx.tracker.log_dict(ctx.pipeline_run_id, info, "stages.json")
        if not data_only:
            ae, cache, diff, samples = arts["autoencoder"], arts["cache"], arts["diffusion"], arts["samples"]
            ctx.tracker.set_tags(ctx.pipeline_run_id, {
                TAG["autoencoder_version"]: ae.model_version or "", TAG["latent_cache_key"]: cache.key,
                TAG["diffusion_version"]: diff.model_version or ""})
            if samples.grid:
                ctx.tracker.log_artifact(ctx.pipeline_run_id, samples.grid, "images")
        ok = True
        return res
    finally:
        ctx.tracker.end_run(ctx.pipeline_run_id, ok=ok)
