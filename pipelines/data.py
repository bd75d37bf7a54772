"""Stage 1, data: captioned images as WebDataset tar shards (img2dataset layout), train/val split.

Sources: `shapes` (procedural, with an exact verifier), `emoji` (Noto Color Emoji), `shards`
(existing shards from a directory, brace pattern or fsspec URL). Generation runs as Ray tasks, one
per shard; every sample is a pure function of (seed, index), so the same seed gives the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cluster.runtime import run_tasks
from pipelines.config import DataConfig
from pipelines.shards import ShardError, encode_png, expand_urls, iter_samples, write_shard
from pipelines.stage import DatasetArtifact, StageContext
from pipelines.tracking import TAG

__all__ = ["prepare_data", "generate_split_plan", "check_shard"]


def _make_source(cfg: DataConfig, split_seed: int, split: str = "train"):
    from pipelines.datasets import SOURCES
    if cfg.source == "shapes":
        # Held-out compositions are kept out of training only; validation images may show them
        # (the autoencoder's reconstruction metrics are not about composition).
        holdout = cfg.holdout if split == "train" else ()
        return SOURCES["shapes"](resolution=cfg.resolution, seed=split_seed, max_objects=cfg.max_objects,
                                 holdout=holdout)
    return SOURCES["emoji"](resolution=cfg.resolution, seed=split_seed, font_path=cfg.font_path)


def generate_split_plan(cfg: DataConfig) -> dict[str, list[tuple[int, list[int]]]]:
    """{split: [(source_seed, indices of one shard), ...]} — deterministic in the config alone."""
    if cfg.source == "shapes":
        # Separate seeds per split: the validation set does not move when num_train changes.
        splits = {"train": (2 * cfg.seed, list(range(cfg.num_train))),
                  "val": (2 * cfg.seed + 1, list(range(cfg.num_val)))}
    else:
        n = len(_make_source(cfg, cfg.seed))  # raises FontNotFoundError early, before any task
        if cfg.num_val >= n:
            raise ValueError(f"data.num_val: {cfg.num_val} leaves no training images out of {n}")
        order = np.random.default_rng(cfg.seed).permutation(n).tolist()
        val, train = order[:cfg.num_val], order[cfg.num_val:]
        if cfg.num_train:
            train = train[:cfg.num_train]
        splits = {"train": (cfg.seed, train), "val": (cfg.seed, val)}
    return {name: [(seed, idx[i:i + cfg.shard_size]) for i in range(0, len(idx), cfg.shard_size)]
            for name, (seed, idx) in splits.items()}


def _write_generated_shard(cfg_dict: dict, source_seed: int, split: str, indices: list[int],
                           path: str) -> int:
    cfg = DataConfig(**cfg_dict)
    source = _make_source(cfg, source_seed, split)

    def samples():
        for i in indices:
            s = source.sample(i)
            meta = dict(s.meta, source=cfg.source, index=i, seed=source_seed, split=split,
                        width=s.image.width, height=s.image.height)
            yield {"__key__": f"{split}-{i:08d}", "png": encode_png(s.image), "txt": s.caption,
                   "json": json.dumps(meta, sort_keys=True)}
    return write_shard(path, samples())


def check_shard(url: str) -> dict:
    """Read a whole shard: count samples, require an image and a caption in each, hash the bytes.
    Any problem raises ShardError naming the shard and the sample."""
    count = 0
    h = hashlib.sha256()
    for sample in iter_samples([url]):
        if not any(ext in sample for ext in ("png", "jpg", "jpeg", "webp")):
            raise ShardError(f"{url}: sample {sample['__key__']} has no image member")
        if "txt" not in sample:
            raise ShardError(f"{url}: sample {sample['__key__']} has no .txt caption")
        for ext in sorted(k for k in sample if not k.startswith("__")):
            h.update(f"{sample['__key__']}.{ext}".encode())
            h.update(hashlib.sha256(sample[ext]).digest())
        count += 1
    if count == 0:
        raise ShardError(f"{url}: empty shard")
    return {"url": url, "count": count, "sha256": h.hexdigest()}


def _checked(urls: list[str]) -> tuple[int, list[str]]:
    results = run_tasks(check_shard, [{"url": u} for u in urls])
    return sum(r["count"] for r in results), [r["sha256"] for r in results]


def prepare_data(cfg: DataConfig, ctx: StageContext) -> DatasetArtifact:
    out = ctx.stage_dir("data")
    with ctx.stage_run("data", cfg) as run_id:
        if cfg.source == "shards":
            train_urls = expand_urls(cfg.train_urls)
            val_urls = expand_urls(cfg.val_urls) if cfg.val_urls else []
        else:
            plan = generate_split_plan(cfg)
            jobs, train_urls, val_urls = [], [], []
            cfg_dict = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
            for split, shards in plan.items():
                for n, (seed, idx) in enumerate(shards):
                    path = str(out / split / f"{split}-{n:06d}.tar")
                    (train_urls if split == "train" else val_urls).append(path)
                    jobs.append(dict(cfg_dict=cfg_dict, source_seed=seed, split=split,
                                     indices=idx, path=path))
            run_tasks(_write_generated_shard, jobs)
        num_train, train_hashes = _checked(train_urls)
        num_val, val_hashes = _checked(val_urls) if val_urls else (0, [])
        # The hash covers member names and contents, not tar headers or file names.
        dataset_hash = hashlib.sha256(json.dumps([train_hashes, val_hashes]).encode()).hexdigest()[:16]
        art = DatasetArtifact(train_urls=train_urls, val_urls=val_urls, num_train=num_train,
                              num_val=num_val, dataset_hash=dataset_hash, source=cfg.source,
                              run_id=run_id)
        ctx.tracker.set_tags(run_id, {TAG["dataset_hash"]: dataset_hash})
        ctx.tracker.log_metrics(run_id, {"num_train": num_train, "num_val": num_val,
                                         "num_train_shards": len(train_urls)})
        _log_preview(ctx, run_id, train_urls[0], out)
        ctx.tracker.log_dict(run_id, {"train_urls": train_urls, "val_urls": val_urls}, "shards.json")
    return art


def _log_preview(ctx: StageContext, run_id: str, url: str, out: Path, n: int = 16) -> None:
    """A grid of the first training images with their captions, for a look in the MLflow UI."""
    from pipelines.images import caption_sheet
    from pipelines.shards import decode_sample, image_of
    items = []
    for raw in iter_samples([url]):
        s = decode_sample(raw)
        items.append((image_of(s), s.get("txt", "")))
        if len(items) >= n:
            break
    path = out / "preview.png"
    caption_sheet(items).save(path)
    ctx.tracker.log_artifact(run_id, path, "images")
