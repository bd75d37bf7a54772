"""Stage 2, autoencoder: a KL-regularised autoencoder trained with Ray Train (DDP; gloo on CPU).

The artifact is `model.safetensors` + `config.json`, whose `extra` carries the latent scale factor
measured on training latents (1 / std, LDM's `scale_by_std`): nothing downstream hard-codes it.
"""
from __future__ import annotations

import math
import shutil

import numpy as np

from cluster.train import barrier_report_dir, report, world_info
from pipelines.config import AutoencoderStageConfig, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import AutoencoderArtifact, DatasetArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

__all__ = ["train_autoencoder", "autoencoder_worker", "image_batches"]


def image_batches(urls, rank, world, batch_size, resolution, seed, repeat=True, preload_max_bytes=2 ** 31):
    """(B, 3, R, R) float tensors in [-1, 1] for this rank: forever (`repeat`) or one ordered pass."""
    import torch
    from pipelines.shards import image_of, image_to_tensor_array, rank_batches, rank_samples

    if repeat:
        # Kept as uint8 in memory; scaled to [-1, 1] per batch.
        def arrays(s):
            return {"x": ((image_to_tensor_array(image_of(s), resolution) + 1) * 127.5).round().astype(np.uint8)}
        for b in rank_batches(urls, rank, world, seed, batch_size, arrays, preload_max_bytes):
            yield torch.from_numpy(b["x"]).float() / 127.5 - 1.0
        return
    batch = []
    for s in rank_samples(urls, rank, world, seed, repeat=False):
        batch.append(image_to_tensor_array(image_of(s), resolution))
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch))
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch))


def autoencoder_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict."""
    import torch
    import torch.distributed as dist
    import ray.train.torch
    from models.autoencoder import AutoencoderConfig, AutoencoderKL, kl_autoencoder_loss, save_pretrained

    rank, world = world_info()
    torch.manual_seed(c["seed"])          # same init on every rank (DDP also broadcasts)
    torch.set_num_threads(max(1, c.get("threads_per_worker", 1)))
    net = AutoencoderKL(AutoencoderConfig.from_dict(c["model"]))
    model = ray.train.torch.prepare_model(net)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"], betas=tuple(c["adam_betas"]))
    torch.manual_seed(c["seed"] * 1000 + rank + 1)   # per-rank posterior samples from here on
    batches = image_batches(c["train_urls"], rank, world, c["batch_size"], c["resolution"], c["seed"],
                            preload_max_bytes=c["preload_max_gb"] * 2 ** 30)
    log = MetricLogger(c["tracking_uri"], c["run_id"]) if rank == 0 else None
    running: dict[str, float] = {}
    for step in range(1, c["max_steps"] + 1):
        x = next(batches).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c["precision"] == "bf16"):
            recon, posterior = model(x)
        loss, logs = kl_autoencoder_loss(x, recon.float(), posterior, c["kl_weight"], c["l2_weight"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in logs.items():
            running[k] = running.get(k, 0.0) + float(v)
        if log and (step % c["log_every"] == 0 or step == c["max_steps"]):
            n = c["log_every"] if step % c["log_every"] == 0 else step % c["log_every"]
            log.log({f"train/{k}": v / n for k, v in running.items()}, step)
            running = {}

    # Latent scale: 1 / std over `scale_batches` batches of posterior samples on every rank.
    net.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for _ in range(c["scale_batches"]):
            z = net.encode(next(batches).to(device)).sample().double()
            stats += torch.stack([z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), device=device,
                                                                        dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    std = math.sqrt(float(stats[1] / stats[2] - mean * mean))
    scale = 1.0 / std

    with barrier_report_dir() as d:
        metrics = {"scale_factor": scale, "latent_mean": float(mean), "latent_std": std}
        if rank == 0:
            metrics.update(_evaluate(net, c, device, d))
            save_pretrained(net, f"{d}/autoencoder",
                            extra={"scale_factor": scale, "latent_mean": float(mean),
                                   "latent_std": std, "trained_steps": c["max_steps"]})
        report(metrics, d if rank == 0 else None)


def _evaluate(net, c, device, out_dir) -> dict[str, float]:
    """Validation reconstruction PSNR/L1 (posterior mode) and a grid: top originals, bottom recons."""
    import torch
    from pipelines.images import grid, to_pil
    urls = c["val_urls"] or c["train_urls"]
    se = l1 = n_pix = 0.0
    first = None
    with torch.no_grad():
        for x in image_batches(urls, 0, 1, c["batch_size"], c["resolution"], 0, repeat=False):
            x = x.to(device)
            r = net.decode(net.encode(x).mode()).clamp(-1, 1)
            se += float(((r - x) ** 2).sum())
            l1 += float((r - x).abs().sum())
            n_pix += x.numel()
            if first is None:
                first = (x[:8].cpu(), r[:8].cpu())
    mse = se / n_pix
    # PSNR on [0, 1] images: the [-1, 1] range doubles the error amplitude.
    psnr = 10 * math.log10(1.0 / (mse / 4)) if mse > 0 else float("inf")
    grid([to_pil(t) for t in torch.cat(first)], cols=len(first[0]), scale=4).save(f"{out_dir}/reconstructions.png")
    return {"val/psnr": psnr, "val/l1": l1 / n_pix}


def train_autoencoder(cfg: AutoencoderStageConfig, data: DatasetArtifact,
                      ctx: StageContext) -> AutoencoderArtifact:
    out = ctx.stage_dir("autoencoder")
    tags = {TAG["dataset_hash"]: data.dataset_hash, TAG["upstream_runs"]: data.run_id}
    with ctx.stage_run("autoencoder", cfg, tags) as run_id:
        # The worker gets the stage config as plain data, plus what it reads and where it logs.
        loop_cfg = {**to_dict(cfg), "resolution": cfg.model.resolution, "train_urls": data.train_urls,
                    "val_urls": data.val_urls, "tracking_uri": ctx.tracker.uri, "run_id": run_id}
        result, metrics = ctx.train(autoencoder_worker, loop_cfg, cfg.num_workers, f"autoencoder-{run_id[:8]}")
        model_dir = ctx.fresh_dir(out / "model")
        with result.checkpoint.as_directory() as d:
            shutil.copytree(f"{d}/autoencoder", model_dir)
            shutil.copy(f"{d}/reconstructions.png", out / "reconstructions.png")
        ae_hash = dir_hash(model_dir)
        ctx.tracker.log_metrics(run_id, metrics, step=cfg.max_steps)
        ctx.tracker.log_artifacts(run_id, model_dir, "autoencoder")
        ctx.tracker.log_artifact(run_id, out / "reconstructions.png", "images")
        version = None
        lineage = {TAG["dataset_hash"]: data.dataset_hash, TAG["autoencoder_hash"]: ae_hash}
        if ctx.config.tracking.register_models:
            version = ctx.tracker.register_model(
                f"{ctx.config.tracking.model_prefix}-autoencoder", run_id, "autoencoder",
                aliases=[ctx.config.name], tags=lineage,
                description="KL autoencoder; config.json extra.scale_factor is the latent scale")
        ctx.tracker.set_tags(run_id, {**lineage, TAG["autoencoder_version"]: version or ""})
        return AutoencoderArtifact(directory=str(model_dir), autoencoder_hash=ae_hash,
                                   scale_factor=metrics["scale_factor"], dataset_hash=data.dataset_hash,
                                   model_version=version, run_id=run_id, metrics=metrics)
