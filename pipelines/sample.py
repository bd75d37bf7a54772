"""Stage 5, sampling: Ray Data batch inference over a prompts file.

Each actor loads the U-Net (EMA weights by default), the text encoder that made the training
states, and the autoencoder once; it runs the configured sampler (DDIM, DDPM, DPM-Solver++ 2M, Euler,
or flow Euler for a flow-matching model) with classifier-free guidance and decodes. Every
image is a pure function of (prompt, seed, sampler settings, model), and is written atomically
under its index, so a re-run skips what exists. A manifest row per image records how it was made.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipelines.config import SampleConfig
from pipelines.stage import (AutoencoderArtifact, DiffusionArtifact, LatentCacheArtifact, SampleArtifact,
                             StageContext)
from pipelines.tracking import TAG

__all__ = ["sample", "read_prompts", "PromptSampler", "PromptsError"]


class PromptsError(ValueError):
    """The prompts file is missing, empty or malformed; the message names the file and line."""


def read_prompts(path: str | None, num_per_prompt: int, base_seed: int) -> list[dict]:
    """Rows {index, prompt, seed}: .txt is one prompt a line; .jsonl rows {"prompt", "seed"?}."""
    if not path:
        raise PromptsError("sample.prompts: no prompts file given")
    p = Path(path)
    if not p.is_file():
        raise PromptsError(f"sample.prompts: file not found: {p}")
    entries: list[tuple[str, int | None]] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptsError(f"{p}:{n}: expected an object with a string \"prompt\"")
            seed = row.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise PromptsError(f"{p}:{n}: \"seed\" must be an integer")
            entries.append((row["prompt"], seed))
    else:
        entries = [(line.strip(), None) for line in lines if line.strip()]
    if not entries:
        raise PromptsError(f"sample.prompts: {p} holds no prompts")
    rows = []
    for i, (prompt, seed) in enumerate(entries):
        for k in range(num_per_prompt):
            index = i * num_per_prompt + k
            rows.append({"index": index, "prompt": prompt,
                         "seed": (seed + k) if seed is not None else base_seed + index})
    return rows


class PromptSampler:
    """A Ray Data actor: the models loaded once (pipelines.pyfunc.BundleSampler, the same sampling
    code as `ldmflow generate` and the pyfunc); each call turns a batch of rows into PNG files."""

    def __init__(self, diffusion_dir: str, autoencoder_dir: str, text_encoder_dir: str,
                 null_text_file: str, scale_factor: float, steps: int, guidance_scale: float,
                 eta: float, use_ema: bool, out_dir: str, sampler: str = "ddim", spacing: str = "trailing",
                 precision: str = "fp32", compile: bool = False):
        from pipelines.pyfunc import BundleSampler, ModelBundle, SamplerSettings
        settings = SamplerSettings(sampler=sampler, spacing=spacing, steps=steps, guidance_scale=guidance_scale,
                                   eta=eta, use_ema=use_ema, precision=precision, compile=compile)
        bundle = ModelBundle(diffusion_dir=diffusion_dir, autoencoder_dir=autoencoder_dir,
                             text_encoder_dir=text_encoder_dir, null_text_file=null_text_file,
                             scale_factor=scale_factor, settings=settings)
        self.sampler = BundleSampler(bundle, settings)
        self.out_dir = Path(out_dir)
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image
        indices = [int(i) for i in batch["index"]]
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        paths = [self.out_dir / "images" / f"{i:08d}.png" for i in indices]
        todo = [j for j, p in enumerate(paths) if not p.is_file()]   # resume: finished images stay
        if todo:
            # An image's noise comes from its own seed; the stochastic samplers' per-step noise from
            # the batch's first seed (see BundleSampler).
            images = self.sampler.sample([prompts[j] for j in todo], [seeds[j] for j in todo])  # (N, H, W, 3)
            for j, img in zip(todo, images):
                tmp = paths[j].with_name(f".{paths[j].name}.tmp{os.getpid()}.png")
                Image.fromarray(img).save(tmp)
                os.replace(tmp, paths[j])
        return {"index": np.array(indices), "prompt": np.array(prompts, dtype=object),
                "seed": np.array(seeds), "path": np.array([str(p) for p in paths], dtype=object),
                "resumed": np.array([j not in todo for j in range(len(indices))])}


def sample(cfg: SampleConfig, diffusion: DiffusionArtifact, autoencoder: AutoencoderArtifact,
           cache: LatentCacheArtifact, ctx: StageContext) -> SampleArtifact:
    from cluster.inference import from_rows, map_with_actors
    from pipelines.images import caption_sheet
    from PIL import Image

    rows = read_prompts(cfg.prompts, cfg.num_per_prompt, cfg.seed)
    out = ctx.stage_dir("samples")
    tags = {TAG["diffusion_version"]: diffusion.model_version, TAG["diffusion_hash"]: diffusion.diffusion_hash,
            TAG["autoencoder_version"]: autoencoder.model_version,
            TAG["autoencoder_hash"]: autoencoder.autoencoder_hash, TAG["latent_cache_key"]: cache.key,
            TAG["upstream_runs"]: f"{diffusion.run_id},{autoencoder.run_id},{cache.run_id}"}
    with ctx.stage_run("sample", cfg, tags) as run_id:
        ds = from_rows(rows)
        ds = map_with_actors(ds, PromptSampler,
                             {"diffusion_dir": diffusion.directory, "autoencoder_dir": autoencoder.directory,
                              "text_encoder_dir": cache.text_encoder_dir,
                              "null_text_file": cache.null_text_file, "scale_factor": cache.scale_factor,
                              "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "eta": cfg.eta,
                              "use_ema": cfg.use_ema, "out_dir": str(out), "sampler": cfg.sampler,
                              "spacing": cfg.spacing, "precision": cfg.precision, "compile": cfg.compile},
                             batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                             num_gpus=1 if ctx.config.cluster.use_gpu else 0)
        done = sorted(ds.take_all(), key=lambda r: int(r["index"]))
        common = {"sampler": cfg.sampler, "spacing": cfg.spacing, "steps": cfg.steps, "eta": cfg.eta,
                  "guidance_scale": cfg.guidance_scale, "precision": cfg.precision,
                  "ema": cfg.use_ema, "diffusion_model_version": diffusion.model_version,
                  "diffusion_hash": diffusion.diffusion_hash,
                  "autoencoder_model_version": autoencoder.model_version,
                  "autoencoder_hash": autoencoder.autoencoder_hash, "latent_cache_key": cache.key,
                  "run_id": run_id}
        manifest = out / "manifest.jsonl"
        tmp = manifest.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in done:
                f.write(json.dumps({"index": int(r["index"]), "prompt": str(r["prompt"]),
                                    "seed": int(r["seed"]), "path": os.path.relpath(str(r["path"]), out),
                                    **common}) + "\n")
        tmp.replace(manifest)
        items = [(Image.open(r["path"]).convert("RGB"), str(r["prompt"])) for r in done[:32]]
        grid_path = out / "grid.png"
        caption_sheet(items, cols=8, size=96).save(grid_path)
        ctx.tracker.log_artifact(run_id, manifest)
        ctx.tracker.log_artifact(run_id, grid_path, "images")
        ctx.tracker.log_metrics(run_id, {"num_images": len(done),
                                         "num_resumed": sum(bool(r["resumed"]) for r in done)})
        return SampleArtifact(directory=str(out), manifest=str(manifest), grid=str(grid_path),
                              num_images=len(done), run_id=run_id)
