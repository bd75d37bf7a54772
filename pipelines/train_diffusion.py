"""Stage 4, diffusion: a text-conditioned U-Net on cached latents, DeepSpeed ZeRO under Ray Train.

Every rank reads its own latent shards, samples z = (mean + std * eps) * scale_factor (the scale
comes from the autoencoder's artifact via the cache), drops captions for classifier-free guidance,
and steps a DeepSpeed engine. At the end every rank saves its ZeRO shard into one Ray checkpoint;
the driver consolidates it (zero_to_fp32) into `unet/model.safetensors`, plus `unet_ema/`.
"""
from __future__ import annotations

import json
import shutil

import numpy as np

from cluster.train import (barrier_report_dir, consolidate_zero_checkpoint, deepspeed_config, report,
                           world_info)
from pipelines.config import DiffusionConfig, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import DiffusionArtifact, LatentCacheArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

__all__ = ["train_diffusion", "diffusion_worker", "latent_batches"]

CKPT_TAG = "final"


def _latent_arrays(s: dict) -> dict:
    return {"mean": s["mean.npy"], "std": s["std.npy"], "text": s["text.npy"], "mask": s["mask.npy"]}


def latent_batches(urls, rank, world, batch_size, seed, preload_max_bytes=2 ** 31):
    """Dicts of tensors: mean/std (B, C, h, w) float32, text (B, L, D) float32, mask (B, L) bool."""
    import torch
    from pipelines.shards import rank_batches
    for b in rank_batches(urls, rank, world, seed, batch_size, _latent_arrays, preload_max_bytes):
        out = {k: torch.from_numpy(v) for k, v in b.items()}
        out["text"] = out["text"].float()   # stored as float16 to halve the cache
        yield out


def _loss_module(denoiser):
    import torch

    class DenoiserLoss(torch.nn.Module):
        # DeepSpeed engines call forward(); with ZeRO-3 its hooks gather parameters around it,
        # so the whole loss (not just the net) must run inside forward.
        def __init__(self, denoiser):
            super().__init__()
            self.denoiser = denoiser

        def forward(self, x0, context, mask):
            return self.denoiser.loss(x0, context, mask)

    return DenoiserLoss(denoiser)


def diffusion_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict."""
    import deepspeed
    import torch
    from models.denoiser import EpsDenoiser, drop_conditioning
    from models.ema import EMA
    from models.schedules import ScheduleConfig
    from models.unet import UNet, UNetConfig
    from models.checkpoint import save_module

    rank, world = world_info()
    on_gpu = torch.cuda.is_available() and c["use_gpu"]
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # Ray made the group already
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(c["seed"])
    unet_cfg = UNetConfig.from_dict(c["unet"])
    schedule = ScheduleConfig.from_dict(c["schedule"])
    denoiser = EpsDenoiser(UNet(unet_cfg), schedule.alphas_cumprod())
    ds_cfg = deepspeed_config(batch_size=c["batch_size"], lr=c["lr"], weight_decay=c["weight_decay"],
                              warmup_steps=c["warmup_steps"], grad_clip=c["grad_clip"],
                              zero_stage=c["zero_stage"], precision=c["precision"], on_gpu=on_gpu)
    module = _loss_module(denoiser)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()
                                                                            if p.requires_grad],
                                           config=ds_cfg)
    dtype = torch.bfloat16 if c["precision"] == "bf16" else torch.float32
    ema = EMA(denoiser.net, decay=c["ema_decay"]) if c["ema_decay"] > 0 else None
    # Same seed above for identical initial weights; from here each rank draws its own timesteps
    # and noise in the loss, or the ranks would repeat each other's draws.
    torch.manual_seed(c["seed"] * 1000 + rank + 1)

    null = np.load(c["null_text_file"])
    null_ctx = torch.from_numpy(null["states"]).float().to(device)
    null_mask = torch.from_numpy(null["mask"]).to(device)
    scale = c["scale_factor"]
    gen = torch.Generator().manual_seed(c["seed"] * 1000 + rank)  # different noise per rank
    batches = latent_batches(c["train_urls"], rank, world, c["batch_size"], c["seed"],
                             c["preload_max_gb"] * 2 ** 30)
    log = MetricLogger(c["tracking_uri"], c["run_id"]) if rank == 0 else None
    running, n_run = 0.0, 0
    for step in range(1, c["max_steps"] + 1):
        b = next(batches)
        eps = torch.randn(b["mean"].shape, generator=gen)
        x0 = ((b["mean"] + b["std"] * eps) * scale).to(device)
        ctx, mask = drop_conditioning(b["text"].to(device), b["mask"].to(device), null_ctx, null_mask,
                                      c["cond_drop_prob"], generator=gen)
        loss = engine(x0.to(dtype), ctx.to(dtype), mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"diffusion loss is {loss.item()} at step {step}")
        engine.backward(loss)
        engine.step()
        if ema is not None:
            ema.update(denoiser.net)
        running += float(loss.detach())
        n_run += 1
        if log and (step % c["log_every"] == 0 or step == c["max_steps"]):
            log.log({"train/loss": running / n_run, "train/lr": engine.get_lr()[0]}, step)
            running, n_run = 0.0, 0

    with barrier_report_dir() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)   # every rank writes its ZeRO partition
        if rank == 0 and ema is not None:
            shadow = UNet(unet_cfg)
            ema.copy_to(shadow)
            save_module(shadow, unet_cfg.to_dict(), f"{d}/unet_ema", extra={"ema_decay": c["ema_decay"],
                                                                           "steps": c["max_steps"]})
        report({"loss": float(loss.detach()), "steps": c["max_steps"]}, d)


def train_diffusion(cfg: DiffusionConfig, cache: LatentCacheArtifact, ctx: StageContext) -> DiffusionArtifact:
    from models.checkpoint import save_module
    from models.unet import UNet

    out = ctx.stage_dir("diffusion")
    tags = {TAG["latent_cache_key"]: cache.key, TAG["autoencoder_version"]: cache.autoencoder_version,
            TAG["autoencoder_hash"]: cache.autoencoder_hash, TAG["dataset_hash"]: cache.dataset_hash,
            TAG["upstream_runs"]: cache.run_id}
    if cfg.unet.context_dim != cache.text_shape[1]:
        raise ValueError(f"diffusion.unet.context_dim: expected the text encoder's width "
                         f"({cache.text_shape[1]}), got {cfg.unet.context_dim}")
    with ctx.stage_run("diffusion", cfg, tags) as run_id:
        # The worker gets the stage config as plain data, plus what it reads and where it logs.
        loop_cfg = {**to_dict(cfg), "use_gpu": ctx.config.cluster.use_gpu, "train_urls": cache.train_urls,
                    "null_text_file": cache.null_text_file, "scale_factor": cache.scale_factor,
                    "tracking_uri": ctx.tracker.uri, "run_id": run_id}
        result, metrics = ctx.train(diffusion_worker, loop_cfg, cfg.num_workers, f"diffusion-{run_id[:8]}")
        model_dir = ctx.fresh_dir(out / "model")
        model_dir.mkdir(parents=True)
        with result.checkpoint.as_directory() as d:
            state = consolidate_zero_checkpoint(d, CKPT_TAG)
            prefix = "denoiser.net."
            unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            unet = UNet(cfg.unet)
            unet.load_state_dict(unet_state, strict=True)
            save_module(unet, cfg.unet.to_dict(), model_dir / "unet", extra={"steps": cfg.max_steps})
            if cfg.ema_decay:
                shutil.copytree(f"{d}/unet_ema", model_dir / "unet_ema")
        (model_dir / "schedule.json").write_text(json.dumps(cfg.schedule.to_dict(), indent=2))
        (model_dir / "conditioning.json").write_text(json.dumps(
            {"latent_cache_key": cache.key, "scale_factor": cache.scale_factor,
             "latent_shape": cache.latent_shape, "text_shape": cache.text_shape,
             "autoencoder_hash": cache.autoencoder_hash}, indent=2))
        d_hash = dir_hash(model_dir)
        ctx.tracker.log_artifacts(run_id, model_dir, "diffusion")
        lineage = {TAG["latent_cache_key"]: cache.key, TAG["diffusion_hash"]: d_hash,
                   TAG["autoencoder_version"]: cache.autoencoder_version or ""}
        version = None
        if ctx.config.tracking.register_models:
            version = ctx.tracker.register_model(
                f"{ctx.config.tracking.model_prefix}-unet", run_id, "diffusion",
                aliases=[ctx.config.name], tags=lineage,
                description="text-conditioned U-Net (eps); unet/ and unet_ema/ safetensors + config")
        ctx.tracker.set_tags(run_id, {**lineage, TAG["diffusion_version"]: version or ""})
        return DiffusionArtifact(directory=str(model_dir), diffusion_hash=d_hash, latent_cache_key=cache.key,
                                 model_version=version, run_id=run_id, metrics=metrics)
