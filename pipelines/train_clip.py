"""Stage 2b, text encoder: contrastive pretraining (CLIP) on the dataset's own image-caption pairs.

No pretrained text encoder can be downloaded here, and a randomly initialised tower gives the U-Net
token states that only hash the words. This stage trains an open_clip `CLIP` (the text tower
`cache.text_encoder` describes plus a small ViT) with open_clip's `ClipLoss` under Ray Train (DDP;
features gathered across ranks with gradients, so the contrastive batch is world * batch_size), then
hands the trained text tower, as a `TextEncoder` directory, to the latent cache.
"""
from __future__ import annotations

import math
import shutil

import numpy as np

from models.lr import warmup_cosine
from cluster.train import barrier_report_dir, report, world_info
from pipelines.config import ClipStageConfig, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import ClipArtifact, DatasetArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

__all__ = ["train_clip", "clip_worker", "retrieval_accuracy"]


def _pair_arrays(resolution: int):
    from pipelines.shards import image_of, image_to_tensor_array

    def arrays(s):
        x = ((image_to_tensor_array(image_of(s), resolution) + 1) * 127.5).round().astype(np.uint8)
        return {"x": x, "caption": np.array(s.get("txt", ""))}
    return arrays


def _lr_at(step: int, c: dict) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip's default schedule)."""
    return warmup_cosine(step, c["lr"], c["warmup_steps"], c["max_steps"])


def clip_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict."""
    import torch
    import ray.train.torch
    from open_clip.loss import ClipLoss
    from models.clip import VisionTowerConfig, build_clip, encode_pair, text_encoder_from_clip
    from models.optim import adam
    from models.text import TextEncoderConfig, save_text_encoder
    from pipelines.shards import rank_batches

    rank, world = world_info()
    text_cfg = TextEncoderConfig.from_dict(c["text_encoder"])
    model = build_clip(text_cfg, VisionTowerConfig.from_dict(c["vision"]))   # same init on every rank
    ddp = ray.train.torch.prepare_model(model)
    device = next(ddp.parameters()).device
    from models.precision import resolve_precision
    bf16 = resolve_precision(c["precision"], device) == "bf16"   # "auto": bf16 only where native
    import open_clip
    tokenizer = open_clip.get_tokenizer(text_cfg.model, context_length=model.context_length)
    # open_clip's recipe: no weight decay on gains, biases, embeddings and the temperature.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = adam([{"params": decay, "weight_decay": c["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, 0.98), eps=1e-6,
               decoupled=True)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
    batches = rank_batches(c["train_urls"], rank, world, c["seed"], c["batch_size"],
                           _pair_arrays(c["resolution"]), c["preload_max_gb"] * 2 ** 30)
    log = MetricLogger(c["tracking_uri"], c["run_id"]) if rank == 0 else None
    running, n_run = 0.0, 0
    for step in range(1, c["max_steps"] + 1):
        b = next(batches)
        x = torch.from_numpy(b["x"]).float().div(127.5).sub(1.0).to(device)
        tokens = tokenizer([str(t) for t in b["caption"]]).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, c)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img_f, txt_f, scale = encode_pair(ddp, x, tokens)
        loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"clip loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():   # CLIP clamps the learned temperature at 100 (ln 100 = 4.6052)
            model.logit_scale.clamp_(0, math.log(100))
        running += float(loss.detach())
        n_run += 1
        if log and (step % c["log_every"] == 0 or step == c["max_steps"]):
            log.log({"train/loss": running / n_run, "train/lr": _lr_at(step, c),
                     "train/logit_scale": float(model.logit_scale.exp())}, step)
            running, n_run = 0.0, 0

    with barrier_report_dir() as d:
        metrics = {"loss": float(loss.detach())}
        if rank == 0:
            model.eval()
            metrics.update(retrieval_accuracy(model, tokenizer, c["val_urls"] or c["train_urls"],
                                              c["resolution"], device))
            save_text_encoder(text_encoder_from_clip(model, text_cfg).eval(), f"{d}/text_encoder",
                              extra={"trained_by": "clip", "steps": c["max_steps"]})
            from models.checkpoint import save_module
            save_module(model, {"text_encoder": text_cfg.to_dict(), "vision": c["vision"]}, f"{d}/clip")
        report(metrics, d if rank == 0 else None)


def retrieval_accuracy(model, tokenizer, urls, resolution, device, max_items: int = 512,
                       group: int = 64) -> dict[str, float]:
    """Top-1 image->caption and caption->image retrieval among groups of `group` held-out pairs
    (chance = 1/group, but duplicate captions in a group count as hits: shapes captions repeat)."""
    import torch
    from pipelines.shards import decode_sample, image_of, image_to_tensor_array, iter_samples
    from models.clip import encode_pair
    xs, caps = [], []
    for raw in iter_samples(urls):
        s = decode_sample(raw)
        xs.append(image_to_tensor_array(image_of(s), resolution))
        caps.append(s.get("txt", ""))
        if len(xs) >= max_items:
            break
    group = min(group, len(xs))
    if group < 2:
        return {}
    i2t = t2i = n = 0
    with torch.no_grad():
        for i in range(0, len(xs) - group + 1, group):
            x = torch.from_numpy(np.stack(xs[i:i + group])).to(device)
            cap = caps[i:i + group]
            img_f, txt_f, _ = encode_pair(model, x, tokenizer(cap).to(device))
            sim = img_f @ txt_f.T   # (G, G)
            same = torch.tensor([[a == b for b in cap] for a in cap], device=sim.device)
            i2t += int(same[torch.arange(group), sim.argmax(1)].sum())
            t2i += int(same[sim.argmax(0), torch.arange(group)].sum())
            n += group
    if n == 0:
        return {}
    return {"val/i2t_top1": i2t / n, "val/t2i_top1": t2i / n, "val/retrieval_chance": 1.0 / group}


def train_clip(cfg: ClipStageConfig, data: DatasetArtifact, ctx: StageContext) -> ClipArtifact:
    out = ctx.stage_dir("clip")
    text_cfg = ctx.config.cache.text_encoder
    tags = {TAG["dataset_hash"]: data.dataset_hash, TAG["upstream_runs"]: data.run_id}
    with ctx.stage_run("clip", cfg, tags) as run_id:
        loop_cfg = {**to_dict(cfg), "text_encoder": text_cfg.to_dict(), "resolution": ctx.config.data.resolution,
                    "train_urls": data.train_urls, "val_urls": data.val_urls,
                    "tracking_uri": ctx.tracker.uri, "run_id": run_id}
        result, metrics = ctx.train(clip_worker, loop_cfg, cfg.num_workers, f"clip-{run_id[:8]}")
        model_dir = ctx.fresh_dir(out / "model")
        model_dir.mkdir(parents=True)
        with result.checkpoint.as_directory() as d:
            shutil.copytree(f"{d}/text_encoder", model_dir / "text_encoder")
            shutil.copytree(f"{d}/clip", model_dir / "clip")
        te_hash = dir_hash(model_dir / "text_encoder")
        ctx.tracker.log_metrics(run_id, metrics, step=cfg.max_steps)
        ctx.tracker.log_artifacts(run_id, model_dir, "clip")
        lineage = {TAG["dataset_hash"]: data.dataset_hash, TAG["text_encoder_hash"]: te_hash}
        version = None
        if ctx.config.tracking.register_models:
            version = ctx.tracker.register_model(
                f"{ctx.config.tracking.model_prefix}-text-encoder", run_id, "clip",
                aliases=[ctx.config.name], tags=lineage,
                description="text tower of a CLIP trained on the dataset (text_encoder/), full CLIP in clip/")
        ctx.tracker.set_tags(run_id, {**lineage, TAG["text_encoder_version"]: version or ""})
        return ClipArtifact(directory=str(model_dir), text_encoder_dir=str(model_dir / "text_encoder"),
                            text_encoder_hash=te_hash, dataset_hash=data.dataset_hash,
                            model_version=version, run_id=run_id, metrics=metrics)
