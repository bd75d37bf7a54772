"""Stage 2, autoencoder: LDM's first stage, KL or VQ, trained with Ray Train (DDP; gloo on CPU).

Per step, on every rank (LDM's two optimizer_idx passes on one batch):
  1. generator: the autoencoder (DDP) reconstructs x; AutoencoderLoss.generator_loss (L1/L2 +
     perceptual, KL or codebook, and from loss.disc_start the PatchGAN term with its adaptive
     weight) + l2_weight * MSE; Adam step on the autoencoder (+ logvar when learned).
  2. discriminator, only from loss.disc_start on: its grads from step 1 are dropped, hinge/vanilla
     loss on D(x), D(sg[x']); its own Adam step. The discriminator is not a DDP module (LDM's
     generator step runs it too, whose gradients DDP would all-reduce for nothing): its gradients
     are averaged over ranks by one flat all_reduce, and its ActNorm's data-dependent init is taken
     from rank 0 and broadcast, so every rank holds the same discriminator.
  3. optional EMA of the autoencoder's weights (models/ema.py); the EMA is what gets exported.
Forward passes of the autoencoder may run under bf16 autocast; losses are computed in fp32.

VQ: the quantiser gets all_reduce = torch_all_reduce_sum and the rank, so code counts, codebook EMA
and dead-code restarts are global and identical on every rank. The autoencoder's DDP is built with
broadcast_buffers=False: the buffers then stay equal because they are computed identically, which
`_check_replicas` verifies at every checkpoint (it raises naming the first tensor that differs).

Checkpoints (every `checkpoint_every` steps and at the last; all ranks report one directory):
    train_state/model.pt     rank 0: autoencoder, discriminator, logvar, both optimizers, EMA
    train_state/rank{r}.pt   step, this rank's RNG states and data position (batches consumed)
    meta.json                rank 0, last: step, config fingerprint, world size, log accumulators
    autoencoder/, reconstructions.png   the last checkpoint only: the artifact (see below)
A worker group restarted by Ray Train (FailureConfig), or the stage run again for the same config
(the Ray run is named after the config's fingerprint), continues from the newest checkpoint and
ends with the same weights as an uninterrupted run.

After training: the latent normalisation (models/latent_norm.py, `latent_norm` "tensor" = LDM's
scale_by_std or "channel") is measured on `scale_batches` batches of training latents per rank
(KL: posterior samples; VQ: the pre-quantisation latent the diffusion model works in), and
validation metrics over `eval_images` held-out images: PSNR, SSIM, L1, the reconstruction Frechet
distance on EfficientNet-Lite0 features (`val/rfd_effnet_lite0`: NOT Inception rFID, not
comparable to published numbers), and for VQ codebook perplexity and usage. The artifact is
`autoencoder/` (model.safetensors + config.json; extra: latent_norm, scale_factor for "tensor",
latent_mean/latent_std, family, ema) + reconstructions.png (top originals, bottom reconstructions).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from cluster.train import (META, CpuBudget, ResumeMismatchError, barrier_report_dir, checked_resume_meta, latest_checkpoint,
                           report, resume_checkpoint, run_checkpoints, world_info)
from pipelines.config import AutoencoderStageConfig, ConfigError, loop_fingerprint, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import AutoencoderArtifact, DatasetArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

__all__ = ["train_autoencoder", "autoencoder_worker", "image_batches", "training_fingerprint",
           "check_resume", "latest_checkpoint", "ResumeMismatchError", "RFD_METRIC", "RFD_NOTE"]

STATE_DIR = "train_state"
MODEL_DIR = "autoencoder"
RECON_FILE = "reconstructions.png"
CHECKPOINTS_KEPT = 2         # on disk per run; the newest is the resume point
GRID_IMAGES = 8              # reconstructions.png: this many originals over their reconstructions
RFD_METRIC = "val/rfd_effnet_lite0"
RFD_NOTE = ("val/rfd_effnet_lite0 is the Frechet distance between validation images and their "
            "reconstructions on EfficientNet-Lite0 pooled features (1280-d, ImageNet weights); it is "
            "not Inception rFID and not comparable to published rFID values.")
# Loop-config keys that do not change what a training step computes; everything else must match
# for a resume ("_" keys are test hooks). Evaluation settings are here too: evaluation runs under
# a forked RNG and changes no training state.
NOT_FINGERPRINTED = frozenset({"max_steps", "max_cpu_seconds", "log_every", "checkpoint_every", "max_failures",
                               "stop_after_steps", "preload_max_gb", "tracking_uri", "run_id", "use_gpu",
                               "resume_from", "eval_every", "eval_images", "eval_rfd", "val_urls",
                               "scale_batches", "latent_norm"})


def image_batches(urls, rank, world, batch_size, resolution, seed, repeat=True, preload_max_bytes=2 ** 31,
                  start=0):
    """(B, 3, R, R) float tensors in [-1, 1] for this rank: forever (`repeat`; `start` batches
    skipped, the resume position) or one ordered pass (the last batch may be short)."""
    import torch
    from pipelines.shards import image_of, image_to_tensor_array, rank_batches, rank_samples

    if repeat:
        # Kept as uint8 in memory; scaled to [-1, 1] per batch.
        def arrays(s):
            return {"x": ((image_to_tensor_array(image_of(s), resolution) + 1) * 127.5).round().astype(np.uint8)}
        for b in rank_batches(urls, rank, world, seed, batch_size, arrays, preload_max_bytes, start=start):
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


# ----------------------------------------------------------------------------------------------
# config fingerprint and resume checks


def training_fingerprint(c: dict) -> tuple[str, dict]:
    """(hash, the fingerprinted part of loop config `c`): what must match for an exact resume
    (max_steps too under a cosine schedule: pipelines.config.loop_fingerprint)."""
    return loop_fingerprint(c, NOT_FINGERPRINTED)


def check_resume(checkpoint_dir: str, c: dict) -> dict:
    """The checkpoint's meta.json, after checking it was written by this training config (loop
    config `c`); ResumeMismatchError names every field that differs otherwise."""
    fp, part = training_fingerprint(c)
    return checked_resume_meta(checkpoint_dir, fp, part, "autoencoder", max_steps=c["max_steps"])


# ----------------------------------------------------------------------------------------------
# data-parallel helpers (every rank calls them together)


def _average_grads(params, world: int) -> None:
    """Average .grad of `params` over ranks (cluster.train.average_gradients)."""
    from cluster.train import average_gradients
    average_gradients(params, world)


def _broadcast_module(module, world: int) -> None:
    """Rank 0's parameters and buffers onto every rank."""
    import torch.distributed as dist
    if world == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def _init_discriminator(disc, x, world: int) -> None:
    """ActNorm initialises from its first training batch; take rank 0's so all ranks agree."""
    import torch
    pending = [m for m in disc.modules() if hasattr(m, "initialized") and not bool(m.initialized)]
    if not pending:
        return
    with torch.no_grad():
        disc(x.float())
    _broadcast_module(disc, world)


def _replica_state(net, loss_fn) -> dict:
    """What must be identical on every rank: the autoencoder's whole state (parameters and the
    quantiser's buffers), the discriminator's parameters and ActNorm flags, logvar. BatchNorm
    running statistics (disc_norm "batch") are per rank and only used in eval mode: left out."""
    state = {f"autoencoder.{k}": v for k, v in net.state_dict().items()}
    state.update({f"discriminator.{k}": v for k, v in loss_fn.discriminator.state_dict().items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))})
    state["logvar"] = loss_fn.logvar.detach()
    return state


def _check_replicas(net, loss_fn, world: int) -> float:
    """Raise unless every rank holds the same training state; returns the largest difference
    between a per-tensor checksum and rank 0's (0.0)."""
    import torch
    import torch.distributed as dist
    state = _replica_state(net, loss_fn)
    names = sorted(state)
    # Two float64 checksums per tensor (sum and sum of squares): equal tensors give equal sums.
    sums = torch.stack([torch.stack([state[k].double().sum(), state[k].double().square().sum()])
                        for k in names])   # (T, 2) on the model's device (nccl gathers GPU tensors)
    if world == 1:
        return 0.0
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums.contiguous())
    worst = 0.0
    for r, g in enumerate(gathered[1:], 1):
        diff = (g - gathered[0]).abs().amax(dim=1)
        worst = max(worst, float(diff.max()))
        bad = [names[i] for i in torch.nonzero(diff).flatten().tolist()]
        if bad:
            raise RuntimeError(f"replicas: rank {r} differs from rank 0 in {len(bad)} tensors (e.g. {bad[:3]}); "
                               f"data-parallel state drifted")
    return worst


# ----------------------------------------------------------------------------------------------
# latent normalisation and metrics


def _latent(net, family: str, x):
    """The latent the diffusion model sees, before normalisation: (B, C, h, w)."""
    return net.encode(x).sample() if family == "kl" else net.encode(x)


def _reconstruct(net, family: str, x):
    """Deterministic reconstruction (KL: posterior mode) and, for VQ, the code indices (B, h, w)."""
    if family == "kl":
        return net.decode(net.encode(x).mode()), None
    out = net(x)   # eval mode: quantises without moving the codebook
    return out.recon, out.indices


def _measure_latent_norm(net, c, batches, device, world):
    """LatentNorm over `scale_batches` training batches per rank (moments summed over ranks), and
    the global mean / std of all latent elements."""
    import torch
    import torch.distributed as dist
    from models.latent_norm import latent_norm_from_moments
    moments = None
    with torch.no_grad():
        for _ in range(c["scale_batches"]):
            z = _latent(net, c["family"], next(batches).to(device)).double()   # (B, C, h, w)
            m = torch.stack([torch.full((z.shape[1],), float(z[:, 0].numel()), dtype=torch.float64,
                                        device=device), z.sum((0, 2, 3)), z.square().sum((0, 2, 3))])
            moments = m if moments is None else moments + m
    if world > 1:
        dist.all_reduce(moments)
    count, total, total_sq = moments.cpu()
    norm = latent_norm_from_moments(c["latent_norm"], count, total, total_sq)
    per_tensor = latent_norm_from_moments("tensor", count, total, total_sq)
    mean = float(total.sum() / count.sum())
    return norm, {"scale_factor": per_tensor.scale[0], "latent_mean": mean, "latent_std": 1.0 / per_tensor.scale[0]}


_FEATURES = {}
# The validation images' feature sums, per worker process and evaluation setting: the same images at
# every evaluation, so only the first computes them (about half of each later evaluation's time).
_REAL_STATS: dict[tuple, object] = {}   # -> FeatureStats.as_tensor() of this rank's share (a tensor)


def _rfd_features(device):
    """EfficientNet-Lite0 pooled features, built once per worker process."""
    from models.metrics import EfficientNetLite0PooledFeatures
    key = str(device)
    if key not in _FEATURES:
        _FEATURES[key] = EfficientNetLite0PooledFeatures().eval().to(device)
    return _FEATURES[key]


def _evaluate(net, c, device, rank, world, grid_path=None) -> dict[str, float]:
    """Validation metrics over at most eval_images held-out images, split over the ranks; every
    rank returns the same numbers (sums all-reduced once at the end, never per batch: ranks may
    hold different numbers of images). Rank 0 writes the reconstruction grid to `grid_path`."""
    import torch
    import torch.distributed as dist
    from models.metrics import SSIM_WINDOW, FeatureStats, frechet_distance, psnr, ssim
    family, res = c["family"], c["resolution"]
    urls = c["val_urls"] or c["train_urls"]
    cap = math.ceil(c["eval_images"] / world) if c["eval_images"] else None
    use_rfd = c["eval_rfd"]
    feats = _rfd_features(device) if use_rfd else None
    real_key = (tuple(urls), rank, world, c["batch_size"], res, cap, str(device))
    known_real = _REAL_STATS.get(real_key) if use_rfd else None   # this rank's share, before the all-reduce
    real = (FeatureStats.from_tensor(known_real, feats.dim) if known_real is not None
            else FeatureStats(feats.dim, device)) if use_rfd else None
    fake = FeatureStats(feats.dim, device) if use_rfd else None
    k = c["quantizer"]["codebook_size"] if family == "vq" else 1
    # [images, sum PSNR, sum SSIM, sum |x - x'| per element, elements, code counts (K,)]
    sums = torch.zeros(5 + k, dtype=torch.float64, device=device)
    first = None
    was_training = net.training
    net.eval()
    with torch.no_grad():
        seen = 0
        for x in image_batches(urls, rank, world, c["batch_size"], res, 0, repeat=False):
            if cap is not None and seen >= cap:
                break
            x = x[: cap - seen] if cap is not None else x
            seen += x.shape[0]
            x = x.to(device)
            r, idx = _reconstruct(net, family, x)
            r = r.float().clamp(-1, 1)
            sums[0] += x.shape[0]
            sums[1] += psnr(x, r).clamp_max(1e3).sum()   # identical images: +inf, capped
            if res >= SSIM_WINDOW:
                sums[2] += ssim(x, r).sum()
            sums[3] += (r - x).abs().double().sum()
            sums[4] += x.numel()
            if idx is not None:
                sums[5:] += torch.bincount(idx.flatten(), minlength=k).double()
            if use_rfd:
                if known_real is None:
                    real.update(feats(x))
                fake.update(feats(r))
            if first is None:
                first = (x[:GRID_IMAGES].cpu(), r[:GRID_IMAGES].cpu())
    if use_rfd and known_real is None:
        _REAL_STATS[real_key] = real.as_tensor()   # a copy: the all-reduce below works on another
    if world > 1:
        dist.all_reduce(sums)
        if use_rfd:
            real_t, fake_t = real.as_tensor(), fake.as_tensor()
            dist.all_reduce(real_t)
            dist.all_reduce(fake_t)
            real, fake = FeatureStats.from_tensor(real_t, feats.dim), FeatureStats.from_tensor(fake_t, feats.dim)
    net.train(was_training)
    n = float(sums[0])
    if n == 0:
        raise RuntimeError(f"evaluate: no validation images in {urls}")
    metrics = {"val/psnr": float(sums[1]) / n, "val/l1": float(sums[3] / sums[4]), "val/images": n}
    if res >= SSIM_WINDOW:
        metrics["val/ssim"] = float(sums[2]) / n
    if use_rfd and real.n >= 2:
        metrics[RFD_METRIC] = frechet_distance(real.mean(), real.cov(), fake.mean(), fake.cov())
    if family == "vq":
        counts = sums[5:]
        p = counts / counts.sum().clamp_min(1.0)
        metrics["val/perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
        metrics["val/codebook_usage"] = float((counts > 0).double().mean())
    if grid_path is not None and rank == 0 and first is not None:
        from pipelines.images import grid, to_pil
        grid([to_pil(t) for t in torch.cat(first)], cols=len(first[0]), scale=4).save(grid_path)
    return metrics


# ----------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(d, *, net, loss_fn, opt_g, opt_d, ema, step, c, rank, world, running, n_run, clock):
    """Every rank writes its part of one checkpoint into `d` (model state is identical on all
    ranks, checked by the caller, so rank 0 writes it once)."""
    import torch
    os.makedirs(os.path.join(d, STATE_DIR), exist_ok=True)
    state = {"step": step, "batches": step, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and c.get("use_gpu"):
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(d, STATE_DIR, f"rank{rank}.pt"))
    if rank == 0:
        torch.save({"model": net.state_dict(), "discriminator": loss_fn.discriminator.state_dict(),
                    "logvar": loss_fn.logvar.detach().clone(), "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "ema": ema.state_dict() if ema is not None else None},
                   os.path.join(d, STATE_DIR, "model.pt"))
        fp, part = training_fingerprint(c)
        meta = {"step": step, "fingerprint": fp, "config": part, "world_size": world,
                "log_running": running, "log_count": n_run, "cpu_seconds": clock.used,
                "train_seconds": clock.wall, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(os.path.join(d, META), "w") as f:   # last: its presence marks a complete checkpoint
            json.dump(meta, f, indent=2)


def _load_checkpoint(d, *, net, loss_fn, opt_g, opt_d, ema, rank, world, c) -> dict:
    import torch
    meta = check_resume(d, c)
    if meta["world_size"] != world:
        raise ResumeMismatchError(f"resume: checkpoint {d} was written by {meta['world_size']} ranks, "
                                  f"this run has {world}")
    mine = os.path.join(d, STATE_DIR, f"rank{rank}.pt")
    if not os.path.isfile(mine):
        raise ResumeMismatchError(f"resume: {d} holds no state for rank {rank}")
    state = torch.load(mine, weights_only=True)
    shared = torch.load(os.path.join(d, STATE_DIR, "model.pt"), weights_only=True)
    if state["step"] != meta["step"]:
        raise RuntimeError(f"resume: {d} mixes steps {state['step']} and {meta['step']}")
    net.load_state_dict(shared["model"])
    loss_fn.discriminator.load_state_dict(shared["discriminator"])
    with torch.no_grad():
        loss_fn.logvar.copy_(shared["logvar"])
    opt_g.load_state_dict(shared["opt_g"])
    opt_d.load_state_dict(shared["opt_d"])
    if ema is not None:
        ema.load_state_dict(shared["ema"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and c.get("use_gpu"):
        torch.cuda.set_rng_state(state["cuda_rng"])
    return {**meta, "batches": state["batches"]}


# ----------------------------------------------------------------------------------------------
# the per-worker loop


def autoencoder_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict (AutoencoderStageConfig's
    fields plus resolution, train_urls, val_urls, use_gpu, tracking_uri, run_id, resume_from).
    Test hooks: `_fail_at_step` makes the last rank raise right after the checkpoint at that step
    (in a run that started before it); `_replica_dir` makes every rank save its final training
    state there as rank{r}.pt."""
    import copy

    import torch
    import torch.nn.functional as F
    import ray.train.torch
    from models.autoencoders import build_autoencoder, load_init_weights
    from models.ema import EMA
    from models.losses import AutoencoderLoss, AutoencoderLossConfig
    from models.optim import adam
    from models.quantize import torch_all_reduce_sum

    rank, world = world_info()
    torch.set_num_threads(max(1, c.get("threads_per_worker", 1)))
    family = c["family"]
    model_cfg = c["model"] if family == "kl" else {"autoencoder": c["model"], "quantizer": c["quantizer"]}
    with resume_checkpoint(c.get("resume_from")) as resume_dir:
        if resume_dir is not None:
            check_resume(resume_dir, c)   # a wrong config fails here, before any model is built
        torch.manual_seed(c["seed"])      # same init on every rank (DDP also broadcasts)
        net = build_autoencoder(family, model_cfg)
        if resume_dir is None and c.get("init_weights"):
            load_init_weights(net, family, c["init_weights"])   # before EMA and DDP copy it
        loss_fn = AutoencoderLoss(AutoencoderLossConfig.from_dict(c["loss"]))
        device = ray.train.torch.get_device()
        net.to(device)
        loss_fn.to(device)
        opt_g = adam(list(net.parameters()) + loss_fn.generator_parameters(), lr=c["lr"],
                     betas=tuple(c["adam_betas"]))
        opt_d = adam(loss_fn.discriminator_parameters(), lr=c["disc_lr"] or c["lr"],
                     betas=tuple(c["adam_betas"]))
        ema = EMA(net, decay=c["ema_decay"]) if c["ema_decay"] > 0 else None
        step, running, n_run, meta = 0, {}, 0, {}
        if resume_dir is not None:
            meta = _load_checkpoint(resume_dir, net=net, loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, ema=ema,
                                    rank=rank, world=world, c=c)
            step, running, n_run = meta["step"], meta["log_running"], meta["log_count"]
        else:
            torch.manual_seed(c["seed"] * 1000 + rank + 1)   # per-rank posterior samples from here on
    # CPU seconds of training steps (the slowest rank's); `max_cpu_seconds` ends training there.
    clock = CpuBudget(c.get("max_cpu_seconds") or 0.0, used=meta.get("cpu_seconds", 0.0), world=world,
                      wall=meta.get("train_seconds", 0.0))
    start_step = step
    # Buffers (the VQ codebook's EMA state) are kept equal by the quantiser's all_reduce, not by
    # DDP's per-forward broadcast from rank 0; _check_replicas verifies it.
    model = ray.train.torch.prepare_model(net, move_to_device=False,
                                          parallel_strategy_kwargs={"broadcast_buffers": False})
    vq_kwargs = {"all_reduce": torch_all_reduce_sum if world > 1 else None, "rank": rank}
    last_layer = net.decoder.conv_out.weight
    g_params = list(net.parameters()) + loss_fn.generator_parameters()
    from models.precision import resolve_precision
    autocast = resolve_precision(c["precision"], device) == "bf16"   # "auto": bf16 only where native
    batches = image_batches(c["train_urls"], rank, world, c["batch_size"], c["resolution"], c["seed"],
                            preload_max_bytes=c["preload_max_gb"] * 2 ** 30, start=step)
    log = MetricLogger(c.get("tracking_uri"), c.get("run_id")) if rank == 0 else None
    max_steps, every = c["max_steps"], c.get("checkpoint_every") or 0
    stop_at, eval_every = c.get("stop_after_steps") or 0, c.get("eval_every") or 0

    def export_model():
        """The model to evaluate and save: the EMA weights when on (a copy), else the net itself."""
        if ema is None:
            return net
        shadow = copy.deepcopy(net)
        ema.copy_to(shadow)
        return shadow

    from models.lr import LR_SCHEDULES
    lr_at = LR_SCHEDULES[c["lr_schedule"]]
    train_seconds, trained_steps = 0.0, 0   # throughput of the steps themselves (no eval, no saving)
    while step < max_steps and not clock.exhausted:
        with clock.step():
            t_step = time.perf_counter()
            gstep = step   # LDM's global_step: optimizer steps taken before this one
            x = next(batches).to(device)
            # A function of (step, CPU used): resumes exactly. Under a CPU budget the schedule decays
            # over the steps the budget will reach at the rate so far.
            planned = clock.planned_steps(step, max_steps)
            lr_g = lr_at(step + 1, c["lr"], c["warmup_steps"], planned)
            for g in opt_g.param_groups:
                g["lr"] = lr_g
            for g in opt_d.param_groups:
                g["lr"] = lr_at(step + 1, c["disc_lr"] or c["lr"], c["warmup_steps"], planned)
            disc_on = loss_fn.discriminator_active(gstep)
            if disc_on:
                _init_discriminator(loss_fn.discriminator, x, world)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x) if family == "kl" else model(x, **vq_kwargs)
            if family == "kl":
                recon, extra, stats = out[0].float(), {"posterior": out[1]}, {}
            else:
                recon, extra, stats = out.recon.float(), {"codebook_loss": out.vq_loss}, out.stats
            g_loss, logs = loss_fn.generator_loss(x, recon, step=gstep, last_layer=last_layer, **extra)
            if c["l2_weight"]:
                g_loss = g_loss + c["l2_weight"] * F.mse_loss(recon, x)
            if not torch.isfinite(g_loss):
                raise FloatingPointError(f"autoencoder loss is {g_loss.item()} at step {step + 1}")
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()              # DDP averages the autoencoder's gradients
            _average_grads(loss_fn.generator_parameters(), world)   # logvar, when learned
            if c["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(g_params, c["grad_clip"])
            opt_g.step()
            logs["total_loss"] = g_loss.detach()
            logs["lr"] = lr_g
            if disc_on:
                # set_to_none drops the gradients the generator loss put into the discriminator.
                opt_d.zero_grad(set_to_none=True)
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), step=gstep)
                d_loss.backward()
                _average_grads(loss_fn.discriminator_parameters(), world)
                if c["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(loss_fn.discriminator_parameters(), c["grad_clip"])
                opt_d.step()
                logs.update(d_logs)
            if ema is not None:
                ema.update(net)
        step += 1
        train_seconds += time.perf_counter() - t_step
        trained_steps += 1
        logs.update(stats)
        for k, v in logs.items():
            running[k] = running.get(k, 0.0) + float(v)
        n_run += 1
        final, stop = step == max_steps or clock.exhausted, step == stop_at
        if log and (step % c["log_every"] == 0 or final):
            log.log({f"train/{k}": v / n_run for k, v in running.items()}, step)
            running, n_run = {}, 0
        if eval_every and step % eval_every == 0 and not final:
            with torch.random.fork_rng(devices=[]):   # evaluation draws nothing from training's RNG
                val = _evaluate(export_model(), c, device, rank, world)
            if log:
                log.log(val, step)
        if not final and (stop or (every and step % every == 0)):
            _check_replicas(net, loss_fn, world)
            with barrier_report_dir() as d:
                _save_checkpoint(d, net=net, loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, ema=ema, step=step,
                                 c=c, rank=rank, world=world, running=running, n_run=n_run, clock=clock)
                report({"step": step, "steps": max_steps}, d)
            fail_at = c.get("_fail_at_step", 0)
            if fail_at and step == fail_at and start_step < fail_at and rank == world - 1:
                time.sleep(2.0)   # let the controller register the checkpoint before the failure
                raise RuntimeError(f"_fail_at_step: simulated worker failure after step {step}")
            if stop:
                return

    # The end (also when resumed from the final checkpoint: the same state gives the same result).
    replica_diff = _check_replicas(net, loss_fn, world)
    if c.get("_replica_dir"):
        torch.save({k: v.detach().cpu().clone() for k, v in _replica_state(net, loss_fn).items()},
                   os.path.join(c["_replica_dir"], f"rank{rank}.pt"))
    exported = export_model().eval()
    with barrier_report_dir() as d:
        _save_checkpoint(d, net=net, loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, ema=ema, step=step,
                         c=c, rank=rank, world=world, running=running, n_run=n_run, clock=clock)
        norm, scale_stats = _measure_latent_norm(exported, c, batches, device, world)
        with torch.random.fork_rng(devices=[]):
            val = _evaluate(exported, c, device, rank, world, grid_path=os.path.join(d, RECON_FILE))
        metrics = {"step": step, "steps": max_steps, **scale_stats, **val, "replica_max_diff": replica_diff,
                   "train_cpu_seconds": clock.used, "budget_exhausted": float(clock.exhausted),
                   "bf16": float(autocast)}
        if trained_steps:
            # images/s over all ranks, measured on rank 0's clock (ranks step in lockstep under DDP)
            metrics["train/images_per_s"] = trained_steps * c["batch_size"] * world / train_seconds
        if rank == 0:
            from models.autoencoders import AUTOENCODER_FAMILIES
            extra = {**norm.to_extra(), "latent_mean": scale_stats["latent_mean"],
                     "latent_std": scale_stats["latent_std"], "family": family, "trained_steps": step,
                     "ema_decay": c["ema_decay"], "weights": "ema" if ema is not None else "raw"}
            AUTOENCODER_FAMILIES[family].save_pretrained(exported, os.path.join(d, MODEL_DIR), extra=extra)
        report(metrics, d)


# ----------------------------------------------------------------------------------------------
# the stage


def _check_init_weights(cfg: AutoencoderStageConfig, path: str) -> dict:
    """load_init_weights into a CPU model of the stage's architecture: a wrong directory or
    another architecture fails here, naming the fields, before Ray starts a worker."""
    from models.autoencoders import build_autoencoder, load_init_weights
    model_cfg = to_dict(cfg.model) if cfg.family == "kl" else {"autoencoder": to_dict(cfg.model),
                                                                "quantizer": to_dict(cfg.quantizer)}
    try:
        return load_init_weights(build_autoencoder(cfg.family, model_cfg), cfg.family, path)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).removeprefix("init_weights: ")
        raise ConfigError(f"autoencoder.init_weights: {msg}") from None


def train_autoencoder(cfg: AutoencoderStageConfig, data: DatasetArtifact,
                      ctx: StageContext) -> AutoencoderArtifact:
    """Train (or continue training) the autoencoder. The Ray run is named after the training
    config's fingerprint, so re-entering a half-finished stage for the same config resumes from its
    last checkpoint; with `stop_after_steps` below max_steps the stage ends with an error after that
    checkpoint (no artifact), and running it again continues."""
    out = ctx.stage_dir("autoencoder")
    tags = {TAG["dataset_hash"]: data.dataset_hash, TAG["upstream_runs"]: data.run_id}
    base_cfg = {**to_dict(cfg), "resolution": cfg.model.resolution, "train_urls": data.train_urls,
                "val_urls": data.val_urls}
    if cfg.init_weights:
        # Absolute: Ray workers run in their own working directory.
        base_cfg["init_weights"] = str(Path(cfg.init_weights).expanduser().resolve())
    fingerprint, _ = training_fingerprint(base_cfg)
    name = f"autoencoder-{fingerprint}"
    resume_from = latest_checkpoint(str(ctx.ray_storage), name)
    if resume_from is not None:
        check_resume(resume_from, base_cfg)   # on the driver too: fail before any worker starts
    elif cfg.init_weights:
        init = _check_init_weights(cfg, base_cfg["init_weights"])   # before any worker starts
        tags.update({"ldmflow.init_weights": base_cfg["init_weights"], "ldmflow.init_format": init["format"]})
    with ctx.stage_run("autoencoder", cfg, {**tags, "ldmflow.resumed_from": resume_from}) as run_id:
        ctx.tracker.set_tags(run_id, {"mlflow.note.content": f"{cfg.family.upper()} autoencoder. {RFD_NOTE}"})
        ctx.tracker.log_params(run_id, {"metrics.rfd_features": "EfficientNet-Lite0 pooled 1280-d; not Inception "
                                                                "rFID, not comparable to published rFID"})
        # The worker gets the stage config as plain data, plus what it reads and where it logs.
        loop_cfg = {**base_cfg, "use_gpu": ctx.config.cluster.use_gpu, "tracking_uri": ctx.tracker.uri,
                    "run_id": run_id, "resume_from": resume_from}
        result, metrics = ctx.train(autoencoder_worker, loop_cfg, cfg.num_workers, name,
                                    max_failures=cfg.max_failures, num_to_keep=CHECKPOINTS_KEPT)
        if int(metrics.get("step", 0)) < cfg.max_steps and not metrics.get("budget_exhausted"):
            raise RuntimeError(f"autoencoder: stopped after step {int(metrics.get('step', 0))} of "
                               f"{cfg.max_steps} (stop_after_steps); run the stage again to continue "
                               f"from its checkpoint in {ctx.ray_storage}/{name}")
        model_dir = ctx.fresh_dir(out / "model")
        with result.checkpoint.as_directory() as d:
            shutil.copytree(f"{d}/{MODEL_DIR}", model_dir)
            shutil.copy(f"{d}/{RECON_FILE}", out / RECON_FILE)
        ae_hash = dir_hash(model_dir)
        ctx.tracker.log_metrics(run_id, metrics, step=int(metrics["step"]))
        ctx.tracker.log_artifacts(run_id, model_dir, "autoencoder")
        ctx.tracker.log_artifact(run_id, out / RECON_FILE, "images")
        version = None
        lineage = {TAG["dataset_hash"]: data.dataset_hash, TAG["autoencoder_hash"]: ae_hash}
        if ctx.config.tracking.register_models:
            version = ctx.tracker.register_model(
                f"{ctx.config.tracking.model_prefix}-autoencoder", run_id, "autoencoder",
                aliases=[ctx.config.name], tags=lineage,
                description=f"{cfg.family.upper()} autoencoder ({'EMA' if cfg.ema_decay else 'raw'} weights); "
                            f"config.json extra.latent_norm is the latent normalisation "
                            f"(models/latent_norm.py), extra.scale_factor the per-tensor scale")
        ctx.tracker.set_tags(run_id, {**lineage, TAG["autoencoder_version"]: version or ""})
        return AutoencoderArtifact(directory=str(model_dir), autoencoder_hash=ae_hash,
                                   scale_factor=metrics["scale_factor"], dataset_hash=data.dataset_hash,
                                   model_version=version, run_id=run_id, metrics=metrics)
