"""Stage 3, latent cache: Ray Data encodes the image shards once with the trained autoencoder (an
actor pool, model loaded once per actor) and the text encoder, and writes latent shards.

Each latent sample: `{key}.mean.npy`, `{key}.std.npy` (posterior, float32, (C, h, w)), `{key}.txt`,
`{key}.text.npy` (per-token text states, float16, (L, D)), `{key}.mask.npy` ((L,) bool).
The cache directory is named by its key: a hash of everything that decides its bytes (autoencoder
hash, scale, resolution, image transforms, text encoder, dataset). A finished cache with the same
key is reused, and a changed input gets a new key: a cache cannot go stale silently.

`cache.root` may be a URL (s3://bucket/latents): the cache is built locally as always, then uploaded
under its key with manifest.json last, so the manifest's presence means the upload completed and a
partial one is never reused. A later run (any machine) with the same key reuses it: the diffusion
workers stream the latent shards from the bucket (pipelines/shards reads URLs through fsspec), and
only the small files (manifest, text encoder, null text) are copied into <output_dir>/latents/<key>.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.config import CacheConfig, config_hash
from pipelines.lineage import dir_hash
from pipelines.shards import IMAGE_EXTS, TRANSFORMS, npy_bytes
from pipelines.stage import AutoencoderArtifact, ClipArtifact, DatasetArtifact, LatentCacheArtifact, StageContext
from pipelines.tracking import TAG

__all__ = ["cache_latents", "LatentEncoder", "cache_key"]


class LatentEncoder:
    """A Ray Data actor: loads the autoencoder (either family, models/autoencoders.load_autoencoder)
    and text encoder once, encodes batches of raw samples.

    What is written is the autoencoder's latent BEFORE normalisation (the LatentNorm in the
    autoencoder's config.json extra is applied by the diffusion stage), as a Gaussian:
      * KL: mean.npy / std.npy are the posterior's, (C, h, w); training latents are mean + std * eps.
      * VQ: mean.npy is the pre-quantisation latent encode(x) (LDM's VQModelInterface: the
        diffusion model works in that continuous space and decode() quantises), std.npy is zeros,
        so the same mean + std * eps gives it exactly and the shard format stays one.
    """

    def __init__(self, autoencoder_dir: str, text_encoder_dir: str, resolution: int):
        import torch
        from models.autoencoder_vq import AutoencoderVQ
        from models.autoencoders import load_autoencoder
        from models.text import load_text_encoder
        torch.set_num_threads(1)
        self.torch = torch
        self.ae, _ = load_autoencoder(autoencoder_dir)
        self.ae.eval()
        self.family = "vq" if isinstance(self.ae, AutoencoderVQ) else "kl"
        self.text = load_text_encoder(text_encoder_dir).eval()
        self.resolution = resolution

    def __call__(self, batch: dict) -> dict:
        from pipelines.shards import decode_sample, image_of, image_to_tensor_array
        torch = self.torch
        keys = [str(k) for k in batch["__key__"]]
        # Only the image and caption are needed; Ray may hand other members over pre-decoded.
        members = [k for k in batch if k in IMAGE_EXTS or k == "txt"]
        samples = [decode_sample({"__key__": key, "__url__": "cache input",
                                  **{m: _as_bytes(batch[m][i]) for m in members if batch[m][i] is not None}})
                   for i, key in enumerate(keys)]
        x = torch.from_numpy(np.stack([image_to_tensor_array(image_of(s), self.resolution)
                                       for s in samples]))
        captions = [s.get("txt", "") for s in samples]
        with torch.no_grad():
            if self.family == "vq":
                mean = self.ae.encode(x).float().numpy()   # (B, code_dim, h, w), pre-quantisation
                std = np.zeros_like(mean)
            else:
                post = self.ae.encode(x)
                mean, std = post.mean.float().numpy(), post.std.float().numpy()
            states, mask = self.text.encode(captions)
        states = states.to(torch.float16).numpy()
        mask = mask.numpy()
        return {
            "__key__": np.array(keys, dtype=object),
            "mean.npy": np.array([npy_bytes(m) for m in mean], dtype=object),
            "std.npy": np.array([npy_bytes(s) for s in std], dtype=object),
            "text.npy": np.array([npy_bytes(s) for s in states], dtype=object),
            "mask.npy": np.array([npy_bytes(m) for m in mask], dtype=object),
            "txt": np.array([c.encode() for c in captions], dtype=object),
        }


def _as_bytes(v) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def cache_key(*, autoencoder_hash: str, scale_factor: float, resolution: int, text_encoder_hash: str,
              dataset_hash: str, split: str = "train") -> tuple[str, dict]:
    parts = {"autoencoder_hash": autoencoder_hash, "scale_factor": repr(float(scale_factor)),
             "resolution": resolution, "transforms": TRANSFORMS, "text_encoder_hash": text_encoder_hash,
             "dataset_hash": dataset_hash, "split": split, "format": "ldmflow-latents-v1"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


def _prepare_text_encoder(cfg: CacheConfig, directory: Path, clip: ClipArtifact | None) -> str:
    """Stage the text encoder once (the CLIP stage's trained tower, else built or loaded pretrained
    from cfg.text_encoder) and return its content hash."""
    from models.text import TextEncoder, save_text_encoder
    if directory.exists():
        shutil.rmtree(directory)
    if clip is not None:
        shutil.copytree(clip.text_encoder_dir, directory)
    else:
        save_text_encoder(TextEncoder(cfg.text_encoder).eval(), directory)
    return dir_hash(directory)


def cache_latents(cfg: CacheConfig, data: DatasetArtifact, autoencoder: AutoencoderArtifact,
                  ctx: StageContext, clip: ClipArtifact | None = None) -> LatentCacheArtifact:
    import torch
    from cluster.inference import map_with_actors, read_shards
    from cluster.storage import check_location, is_url, join
    from models.latent_norm import load_latent_norm
    from models.text import load_text_encoder

    remote = cfg.root if cfg.root and is_url(cfg.root) else None
    check_location(remote, "cache.root")
    # A URL root: the cache is built, and its small files kept, in a local directory first.
    root = Path(cfg.root).expanduser() if cfg.root and not remote else ctx.output_dir / "latents"
    root.mkdir(parents=True, exist_ok=True)
    tags = {TAG["dataset_hash"]: data.dataset_hash, TAG["autoencoder_hash"]: autoencoder.autoencoder_hash,
            TAG["autoencoder_version"]: autoencoder.model_version,
            TAG["upstream_runs"]: ",".join(r for r in (data.run_id, autoencoder.run_id,
                                                       clip.run_id if clip else None) if r)}
    if clip is not None:
        tags[TAG["text_encoder_version"]] = clip.model_version
    with ctx.stage_run("cache", cfg, tags) as run_id:
        staging = root / f".text-encoder-{config_hash(cfg.text_encoder)}-{os.getpid()}"
        te_hash = _prepare_text_encoder(cfg, staging, clip)
        resolution = ctx.config.data.resolution
        key, parts = cache_key(autoencoder_hash=autoencoder.autoencoder_hash,
                               scale_factor=autoencoder.scale_factor, resolution=resolution,
                               text_encoder_hash=te_hash, dataset_hash=data.dataset_hash)
        cache_dir = root / key
        manifest_path = cache_dir / "manifest.json"
        remote_dir = join(remote, key) if remote else None
        reused = _remote_complete(remote_dir) if remote_dir else manifest_path.is_file()
        if remote_dir and reused:
            shutil.rmtree(staging)
            _fetch_small_files(remote_dir, root, key)
        elif reused:
            shutil.rmtree(staging)
        else:
            if remote_dir and cache_dir.exists():
                shutil.rmtree(cache_dir)   # a local copy of a remote cache that is gone: build anew
            # Build in a temp dir and rename at the end: a crash never leaves a half cache under the key.
            _remove_stale_partials(root, key)
            tmp = root / f".{key}.partial-{os.getpid()}"
            tmp.mkdir()
            staging.rename(tmp / "text_encoder")
            text = load_text_encoder(tmp / "text_encoder").eval()
            with torch.no_grad():
                null_states, null_mask = text.encode([""])
            np.savez(tmp / "null_text.npz", states=null_states[0].float().numpy(),
                     mask=null_mask[0].numpy())
            ds = read_shards(data.train_urls)
            ds = map_with_actors(ds, LatentEncoder,
                                 {"autoencoder_dir": autoencoder.directory,
                                  "text_encoder_dir": str(tmp / "text_encoder"), "resolution": resolution},
                                 batch_size=cfg.batch_size, concurrency=cfg.concurrency, reserve_cpus=1)
            ds.write_webdataset(str(tmp / "shards"), encoder=None, min_rows_per_file=1024)
            shards = sorted(str(p.relative_to(tmp)) for p in (tmp / "shards").glob("*.tar"))
            first = _first_sample(tmp / shards[0])
            manifest = {"key": key, "key_parts": parts, "shards": shards,
                        "num_samples": data.num_train,
                        "latent_shape": list(first["mean.npy"].shape),
                        "text_shape": list(first["text.npy"].shape),
                        "autoencoder": {"directory": autoencoder.directory,
                                        "hash": autoencoder.autoencoder_hash,
                                        "model_version": autoencoder.model_version,
                                        "scale_factor": autoencoder.scale_factor},
                        "text_encoder": {"config": cfg.text_encoder.to_dict(), "hash": te_hash,
                                         "trained_by_run": clip.run_id if clip else None,
                                         "model_version": clip.model_version if clip else None},
                        "dataset_hash": data.dataset_hash, "train_urls": data.train_urls}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            tmp.rename(cache_dir)
            if remote_dir:
                _upload(cache_dir, remote_dir)
        if remote_dir:
            from cluster.storage import read_text
            manifest = json.loads(read_text(join(remote_dir, "manifest.json")))
        else:
            manifest = json.loads(manifest_path.read_text())
        ctx.tracker.set_tags(run_id, {TAG["latent_cache_key"]: key, "ldmflow.cache_reused": reused,
                                      TAG["text_encoder_hash"]: te_hash,
                                      **({"ldmflow.cache_uri": remote_dir} if remote_dir else {})})
        ctx.tracker.log_dict(run_id, manifest, "manifest.json")
        ctx.tracker.log_metrics(run_id, {"num_samples": manifest["num_samples"],
                                         "num_shards": len(manifest["shards"])})
        return LatentCacheArtifact(
            directory=str(cache_dir), key=key,
            train_urls=[join(remote_dir, s) if remote_dir else str(cache_dir / s) for s in manifest["shards"]],
            num_samples=manifest["num_samples"], text_encoder_dir=str(cache_dir / "text_encoder"),
            text_encoder_hash=te_hash,
            null_text_file=str(cache_dir / "null_text.npz"), scale_factor=autoencoder.scale_factor,
            latent_shape=manifest["latent_shape"], text_shape=manifest["text_shape"],
            autoencoder_hash=autoencoder.autoencoder_hash, autoencoder_version=autoencoder.model_version,
            latent_norm=load_latent_norm(autoencoder.directory).to_dict(),
            dataset_hash=data.dataset_hash, run_id=run_id, uri=remote_dir)


def _remote_complete(remote_dir: str) -> bool:
    """A cache at a URL is complete when its manifest is there (uploaded last by _upload)."""
    from cluster.storage import isfile, join
    return isfile(join(remote_dir, "manifest.json"))


def _upload(cache_dir: Path, remote_dir: str) -> None:
    """Shards, text encoder, null text, then manifest.json: a reader that finds the manifest finds
    everything it lists. The local shards go afterwards (train_urls point at the bucket)."""
    from cluster.storage import upload_dir
    upload_dir(cache_dir, remote_dir, last=["manifest.json"])
    shutil.rmtree(cache_dir / "shards")


def _fetch_small_files(remote_dir: str, root: Path, key: str) -> None:
    """Copy a remote cache's files except its shards to root/key (atomically: a partial dir, then a
    rename), unless an earlier run did."""
    from cluster.storage import download_dir
    if (root / key / "manifest.json").is_file():
        return
    _remove_stale_partials(root, key)
    tmp = root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    download_dir(remote_dir, tmp, exclude=("shards/",))
    if (root / key).exists():
        shutil.rmtree(root / key)
    tmp.rename(root / key)


def _remove_stale_partials(root: Path, key: str) -> None:
    """Half-written caches of this key left by processes that no longer run (a crash, a kill)."""
    for p in root.glob(f".{key}.partial-*"):
        pid = int(p.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)   # still running (maybe another pipeline building the same key): leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def _first_sample(url) -> dict:
    from pipelines.shards import decode_sample, iter_samples
    for raw in iter_samples([str(url)]):
        return decode_sample(raw)
    raise RuntimeError(f"{url}: latent shard is empty")
