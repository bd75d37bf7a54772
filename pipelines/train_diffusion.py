"""Stage 4, diffusion: a text-conditioned U-Net on cached latents, DeepSpeed ZeRO under Ray Train.

Every rank reads its own latent shards, samples z = (mean + std * eps) * scale_factor (the scale
comes from the autoencoder's artifact via the cache), drops captions for classifier-free guidance,
and steps a DeepSpeed engine (ZeRO 0-3, fp32 or bf16 autocast, `grad_accum` micro-batches per optimizer
step). An fp32 EMA of the U-Net follows the optimizer steps, per rank over its ZeRO-3 partition.

Checkpoints are exact resume points. Every `checkpoint_every` optimizer steps (and at the last)
every rank writes into one Ray Train checkpoint:
    ds/                      DeepSpeed: module, optimizer partitions, LR scheduler, step counters
    train_state/rank{r}.pt   step, RNG states (torch global, the loop's generator, CUDA), data position
    train_state/ema*.pt      the EMA (rank 0's whole shadow; under ZeRO-3 one slice per rank)
    meta.json, losses.npy    rank 0: step, config fingerprint, per-step loss curve, log accumulator
    unet_ema/                the last checkpoint only: the consolidated EMA U-Net (safetensors)
A run started again - by Ray Train after a worker failure (FailureConfig), or by the stage for the
same config (the Ray run name is the config's fingerprint) - continues from the newest one and
produces the same weights, EMA and loss curve as a run that was never interrupted. The driver then
consolidates the last checkpoint (zero_to_fp32) into `unet/model.safetensors`, plus `unet_ema/`.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from cluster.train import (META, CpuBudget, ResumeMismatchError, checked_resume_meta, latest_checkpoint, barrier_report_dir, consolidate_zero_checkpoint, deepspeed_config, report,
                           resume_checkpoint, run_checkpoints, world_info)
from pipelines.config import DiffusionConfig, loop_fingerprint, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import DiffusionArtifact, LatentCacheArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

__all__ = ["train_diffusion", "diffusion_worker", "latent_batches", "training_fingerprint",
           "check_resume", "latest_checkpoint", "ResumeMismatchError"]

CKPT_TAG = "ds"              # DeepSpeed's subdirectory inside every checkpoint
STATE_DIR = "train_state"
LOSSES = "losses.npy"
# Loop-config keys that do not change what a step computes: a run may resume with other values
# (train longer, log or checkpoint more often, move the tracking server). Everything else - the
# U-Net, schedule, optimizer, batch size, world size, seed, grad_accum, ZeRO stage, precision, data
# - is fingerprinted; keys starting with "_" are test hooks and never fingerprinted.
NOT_FINGERPRINTED = frozenset({"max_steps", "max_cpu_seconds", "log_every", "checkpoint_every", "max_failures",
                               "stop_after_steps", "preload_max_gb", "tracking_uri", "run_id",
                               "use_gpu", "resume_from", "compile"})   # compiled or not, the same math
CHECKPOINTS_KEPT = 2         # on disk per run; the newest is the resume point


def _latent_arrays(s: dict) -> dict:
    return {"mean": s["mean.npy"], "std": s["std.npy"], "text": s["text.npy"], "mask": s["mask.npy"]}


def latent_batches(urls, rank, world, batch_size, seed, preload_max_bytes=2 ** 31, start=0):
    """Dicts of tensors: mean/std (B, C, h, w) float32, text (B, L, D) float32, mask (B, L) bool.
    `start` batches are skipped: the same sequence an uninterrupted iterator gives from there."""
    import torch
    from pipelines.shards import rank_batches
    for b in rank_batches(urls, rank, world, seed, batch_size, _latent_arrays, preload_max_bytes, start=start):
        out = {k: torch.from_numpy(v) for k, v in b.items()}
        out["text"] = out["text"].float()   # stored as float16 to halve the cache
        yield out


# ----------------------------------------------------------------------------------------------
# config fingerprint and resume checks


def training_fingerprint(c: dict) -> tuple[str, dict]:
    """(hash, the fingerprinted part of loop config `c`): what must match for a bit-exact resume."""
    return loop_fingerprint(c, NOT_FINGERPRINTED)


def check_resume(checkpoint_dir: str, c: dict) -> dict:
    """The checkpoint's meta.json, after checking it was written by this training config (loop
    config `c`); ResumeMismatchError names every field that differs otherwise."""
    fp, part = training_fingerprint(c)
    return checked_resume_meta(checkpoint_dir, fp, part, "diffusion", max_steps=c["max_steps"])


# ----------------------------------------------------------------------------------------------
# the per-worker loop


def _loss_module(denoiser, generator):
    import torch

    class DenoiserLoss(torch.nn.Module):
        # DeepSpeed engines call forward(); with ZeRO-3 its hooks gather parameters around it,
        # so the whole loss (not just the net) must run inside forward. The generator draws the
        # loss's timesteps and noise, so a checkpoint can save and restore that stream exactly.
        def __init__(self, denoiser, generator):
            super().__init__()
            self.denoiser = denoiser
            self.generator = generator

        def forward(self, x0, context, mask):
            return self.denoiser.loss(x0, context, mask, generator=self.generator)

    return DenoiserLoss(denoiser, generator)


def _save_checkpoint(d, *, engine, ema, gen, step, micro, c, losses, running, n_run, rank, world,
                     final, unet_cfg, clock):
    """Every rank writes its part of one checkpoint into `d` (a collective under ZeRO-3)."""
    import torch
    from models.checkpoint import save_module
    from models.unet import UNet

    engine.save_checkpoint(d, tag=CKPT_TAG)   # module, optimizer partition, LR scheduler
    os.makedirs(os.path.join(d, STATE_DIR), exist_ok=True)
    state = {"step": step, "micro_batches": micro, "torch_rng": torch.get_rng_state(),
             "generator": gen.get_state()}
    if torch.cuda.is_available() and c["use_gpu"]:
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(d, STATE_DIR, f"rank{rank}.pt"))
    if ema is not None:
        # ZeRO-1/2: every rank's shadow is the same, rank 0 saves it; ZeRO-3: each its own slice.
        if ema.partitioned:
            torch.save(ema.state_dict(), os.path.join(d, STATE_DIR, f"ema_rank{rank}.pt"))
        elif rank == 0:
            torch.save(ema.state_dict(), os.path.join(d, STATE_DIR, "ema.pt"))
        if final:
            full = ema.consolidated_state_dict()   # all ranks: gathers ZeRO-3 slices
            if rank == 0:
                shadow = UNet(unet_cfg)
                shadow.load_state_dict(full, strict=True)
                save_module(shadow, unet_cfg.to_dict(), f"{d}/unet_ema",
                            extra={"ema_decay": c["ema_decay"], "steps": step})
    if rank == 0:
        np.save(os.path.join(d, LOSSES), np.asarray(losses, dtype=np.float64))
        fp, part = training_fingerprint(c)
        meta = {"step": step, "fingerprint": fp, "config": part, "world_size": world,
                "micro_batches_per_rank": micro, "log_running": running, "log_count": n_run,
                "cpu_seconds": clock.used, "train_seconds": clock.wall, "budget_exhausted": clock.exhausted,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(os.path.join(d, META), "w") as f:   # last: its presence marks a complete checkpoint
            json.dump(meta, f, indent=2)


def _load_checkpoint(d, *, engine, ema, gen, rank, c):
    """Restore everything `_save_checkpoint` wrote for this rank. Returns (meta, micro, losses)."""
    import torch

    meta = check_resume(d, c)
    if meta["world_size"] != world_info()[1]:   # also fingerprinted via num_workers; Ray decides the truth
        raise ResumeMismatchError(f"resume: checkpoint {d} was written by {meta['world_size']} ranks, "
                                  f"this run has {world_info()[1]}")
    path, _ = engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"resume: no DeepSpeed checkpoint {CKPT_TAG!r} in {d}")
    state = torch.load(os.path.join(d, STATE_DIR, f"rank{rank}.pt"), weights_only=True)
    if state["step"] != meta["step"]:
        raise RuntimeError(f"resume: {d} mixes steps {state['step']} and {meta['step']}")
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["generator"])
    if "cuda_rng" in state and torch.cuda.is_available() and c["use_gpu"]:
        torch.cuda.set_rng_state(state["cuda_rng"])
    if ema is not None:
        name = f"ema_rank{rank}.pt" if ema.partitioned else "ema.pt"
        ema.load_state_dict(torch.load(os.path.join(d, STATE_DIR, name), weights_only=True))
    losses = np.load(os.path.join(d, LOSSES)).tolist()[:meta["step"]]
    return meta, int(state["micro_batches"]), losses


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process: 1 for the U-Net's forward without graph
    breaks (its backward is compiled with it), more with breaks, 0 if nothing was compiled."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def diffusion_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict (DiffusionConfig's fields plus
    use_gpu, train_urls, null_text_file, scale_factor, tracking_uri, run_id, resume_from).
    Test hook: `_fail_at_step` makes rank world-1 raise right after the checkpoint at that step,
    in a run that started before it (so a FailureConfig restart then runs through)."""
    import deepspeed
    import torch
    from models.denoiser import EpsDenoiser, drop_conditioning
    from models.ema import EMA
    from models.schedules import ScheduleConfig
    from models.unet import UNet, UNetConfig

    rank, world = world_info()
    on_gpu = torch.cuda.is_available() and c["use_gpu"]
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # Ray made the group already
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    grad_accum, max_steps = c["grad_accum"], c["max_steps"]
    from models.precision import resolve_precision
    precision = resolve_precision(c["precision"], device)   # "auto": bf16 only where native
    with resume_checkpoint(c.get("resume_from")) as resume_dir:
        if resume_dir is not None:
            check_resume(resume_dir, c)   # a wrong config fails here, before any model is built
        torch.manual_seed(c["seed"])
        unet_cfg = UNetConfig.from_dict(c["unet"])
        schedule = ScheduleConfig.from_dict(c["schedule"])
        from models.denoiser import ObjectiveConfig, build_denoiser
        # eps/v/x0 diffusion or flow matching: the objective wraps the net, the net never knows.
        denoiser = build_denoiser(UNet(unet_cfg), schedule, ObjectiveConfig.from_dict(c["objective"]))
        # One CPU generator per rank draws everything random in a step - latent sample, caption
        # dropout, timesteps, loss noise - different per rank, saved and restored with checkpoints.
        gen = torch.Generator().manual_seed(c["seed"] * 1000 + rank)
        ds_cfg = deepspeed_config(batch_size=c["batch_size"], lr=c["lr"], weight_decay=c["weight_decay"],
                                  warmup_steps=c["warmup_steps"], grad_clip=c["grad_clip"],
                                  zero_stage=c["zero_stage"], precision=precision, on_gpu=on_gpu,
                                  grad_accum=grad_accum, lr_scheduler=c["lr_schedule"] == "constant")
        module = _loss_module(denoiser, gen)
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()
                                                                                if p.requires_grad],
                                               config=ds_cfg)
        # After initialize: under ZeRO-3 the parameters are partitioned now and the EMA keeps
        # a slice per rank (see models/ema.py for why not GatheredParameters every step).
        ema = EMA(denoiser.net, decay=c["ema_decay"]) if c["ema_decay"] > 0 else None
        if c.get("compile"):
            # In place (nn.Module.compile): the same parameters, state_dict keys, EMA and ZeRO
            # gradient hooks; DeepSpeed and the loss around the net stay eager. Compiles at step 1.
            denoiser.net.compile()
        # Same seed above for identical initial weights; from here each rank has its own global
        # stream (anything not driven by `gen`, e.g. dropout in the net).
        torch.manual_seed(c["seed"] * 1000 + rank + 1)
        step, micro, losses, running, n_run, meta = 0, 0, [], 0.0, 0, {}
        if resume_dir is not None:
            meta, micro, losses = _load_checkpoint(resume_dir, engine=engine, ema=ema, gen=gen, rank=rank, c=c)
            step, running, n_run = meta["step"], meta["log_running"], meta["log_count"]
    # CPU seconds of training steps (the slowest rank's); `max_cpu_seconds` ends training there.
    clock = CpuBudget(c.get("max_cpu_seconds") or 0.0, used=meta.get("cpu_seconds", 0.0), world=world,
                      wall=meta.get("train_seconds", 0.0))
    start_step = step
    finished_before = step == max_steps or clock.exhausted

    null = np.load(c["null_text_file"])
    null_ctx = torch.from_numpy(null["states"]).float().to(device)
    null_mask = torch.from_numpy(null["mask"]).to(device)
    from models.latent_norm import LatentNorm
    # The autoencoder's measured latent normalisation (per-tensor scale or per-channel shift/scale).
    norm = (LatentNorm.from_dict(c["latent_norm"]) if c.get("latent_norm")
            else LatentNorm.from_extra({"scale_factor": c["scale_factor"]}))
    # The data position: this rank's micro-batches consumed so far (grad_accum per optimizer step).
    batches = latent_batches(c["train_urls"], rank, world, c["batch_size"], c["seed"],
                             c["preload_max_gb"] * 2 ** 30, start=micro)
    log = MetricLogger(c["tracking_uri"], c["run_id"]) if rank == 0 and c.get("tracking_uri") else None
    stop_at = c.get("stop_after_steps") or 0
    every = c.get("checkpoint_every") or 0
    step_loss = float("nan")
    # "constant" is DeepSpeed's WarmupLR (its state in the checkpoint). Otherwise the rate is a pure
    # function of (step, CPU used), both checkpointed, set before each optimizer step: a resumed run
    # recomputes it, and under a CPU budget it decays over the steps the budget will reach.
    lr_at = None
    if c["lr_schedule"] != "constant":
        from models.lr import LR_SCHEDULES
        lr_at = LR_SCHEDULES[c["lr_schedule"]]
    while step < max_steps and not clock.exhausted:
        step_loss = 0.0
        if lr_at is not None:
            rate = lr_at(step + 1, c["lr"], c["warmup_steps"], clock.planned_steps(step, max_steps))
            for g in engine.optimizer.param_groups:
                g["lr"] = rate
        with clock.step():
            for _ in range(grad_accum):
                b = next(batches)
                micro += 1
                eps = torch.randn(b["mean"].shape, generator=gen)
                x0 = norm.normalize(b["mean"] + b["std"] * eps).to(device)   # VQ: std = 0, the pre-quant latent
                ctx, mask = drop_conditioning(b["text"].to(device), b["mask"].to(device), null_ctx, null_mask,
                                              c["cond_drop_prob"], generator=gen)
                loss = engine(x0, ctx, mask)   # float32 in; under bf16 the engine autocasts
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"diffusion loss is {loss.item()} at step {step + 1}")
                engine.backward(loss)   # DeepSpeed scales by 1/grad_accum and steps at the boundary
                engine.step()
                step_loss += float(loss.detach()) / grad_accum
        step += 1
        if ema is not None:
            ema.update(denoiser.net)
        losses.append(step_loss)
        running += step_loss
        n_run += 1
        final = step == max_steps or clock.exhausted
        if log and (step % c["log_every"] == 0 or final):
            log.log({"train/loss": running / n_run, "train/lr": engine.get_lr()[0]}, step)
            running, n_run = 0.0, 0
        stop = step == stop_at
        if final or stop or (every and step % every == 0):
            with barrier_report_dir() as d:
                _save_checkpoint(d, engine=engine, ema=ema, gen=gen, step=step, micro=micro, c=c,
                                 losses=losses, running=running, n_run=n_run, rank=rank, world=world,
                                 final=final, unet_cfg=unet_cfg, clock=clock)
                report({"loss": step_loss, "step": step, "steps": max_steps, "resumed_from_step": start_step,
                        "optimizer_steps": engine.global_steps, "micro_batches": micro,
                        "train_cpu_seconds": clock.used, "train_seconds": clock.wall,
                        "budget_exhausted": float(clock.exhausted), "bf16": float(precision == "bf16"),
                        "lr": float(engine.get_lr()[0]),   # the rate the last step took
                        **({"compiled_graphs": float(_compiled_graphs())} if c.get("compile") else {})}, d)
            fail_at = c.get("_fail_at_step", 0)
            if fail_at and step == fail_at and start_step < fail_at and rank == world - 1:
                time.sleep(2.0)   # let the controller register the checkpoint before the failure
                raise RuntimeError(f"_fail_at_step: simulated worker failure after step {step}")
        if stop and not final:
            return
    if finished_before:
        # Resumed from the final checkpoint: nothing to train. Report the metrics only; the driver
        # takes that checkpoint (Ray's restored latest, or resume_from) as the result.
        report({"loss": losses[-1] if losses else step_loss, "step": step, "steps": max_steps,
                "train_cpu_seconds": clock.used, "train_seconds": clock.wall,
                "budget_exhausted": float(clock.exhausted), "bf16": float(precision == "bf16")})


# ----------------------------------------------------------------------------------------------
# the stage


def train_diffusion(cfg: DiffusionConfig, cache: LatentCacheArtifact, ctx: StageContext) -> DiffusionArtifact:
    """Train (or continue training) the U-Net. The Ray run is named after the training config's
    fingerprint, so re-entering a half-finished stage for the same config resumes from its last
    checkpoint; with `stop_after_steps` below max_steps the stage ends with an error after that
    checkpoint (no artifact), and running it again continues."""
    from models.checkpoint import save_module
    from models.unet import UNet

    out = ctx.stage_dir("diffusion")
    tags = {TAG["latent_cache_key"]: cache.key, TAG["autoencoder_version"]: cache.autoencoder_version,
            TAG["autoencoder_hash"]: cache.autoencoder_hash, TAG["dataset_hash"]: cache.dataset_hash,
            TAG["upstream_runs"]: cache.run_id}
    if cfg.unet.context_dim != cache.text_shape[1]:
        raise ValueError(f"diffusion.unet.context_dim: expected the text encoder's width "
                         f"({cache.text_shape[1]}), got {cfg.unet.context_dim}")
    base_cfg = {**to_dict(cfg), "train_urls": cache.train_urls, "null_text_file": cache.null_text_file,
                "scale_factor": cache.scale_factor, "latent_norm": cache.latent_norm}
    fingerprint, _ = training_fingerprint(base_cfg)
    name = f"diffusion-{fingerprint}"
    resume_from = latest_checkpoint(str(ctx.ray_storage), name)
    if resume_from is not None:
        check_resume(resume_from, base_cfg)   # on the driver too: fail before any worker starts
    with ctx.stage_run("diffusion", cfg, {**tags, "ldmflow.resumed_from": resume_from}) as run_id:
        # The worker gets the stage config as plain data, plus what it reads and where it logs.
        loop_cfg = {**base_cfg, "use_gpu": ctx.config.cluster.use_gpu, "tracking_uri": ctx.tracker.uri,
                    "run_id": run_id, "resume_from": resume_from}
        result, metrics = ctx.train(diffusion_worker, loop_cfg, cfg.num_workers, name,
                                    max_failures=cfg.max_failures, num_to_keep=CHECKPOINTS_KEPT)
        if int(metrics.get("step", 0)) < cfg.max_steps and not metrics.get("budget_exhausted"):
            raise RuntimeError(f"diffusion: stopped after step {int(metrics.get('step', 0))} of "
                               f"{cfg.max_steps} (stop_after_steps); run the stage again to continue "
                               f"from its checkpoint in {ctx.ray_storage}/{name}")
        model_dir = ctx.fresh_dir(out / "model")
        model_dir.mkdir(parents=True)
        final_ckpt = result.checkpoint
        if final_ckpt is None and resume_from is not None:   # the run had already finished
            from cluster.train import checkpoint_at
            final_ckpt = checkpoint_at(resume_from)   # a local directory or a URL
        with final_ckpt.as_directory() as d:
            state = consolidate_zero_checkpoint(d, CKPT_TAG)
            prefix = "denoiser.net."
            unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            unet = UNet(cfg.unet)
            unet.load_state_dict(unet_state, strict=True)
            save_module(unet, cfg.unet.to_dict(), model_dir / "unet", extra={"steps": int(metrics["step"])})
            if cfg.ema_decay:
                shutil.copytree(f"{d}/unet_ema", model_dir / "unet_ema")
        (model_dir / "schedule.json").write_text(json.dumps(cfg.schedule.to_dict(), indent=2))
        # Saved beside the weights: sampling converts the net's output by it.
        (model_dir / "objective.json").write_text(json.dumps(cfg.objective.to_dict(), indent=2))
        (model_dir / "conditioning.json").write_text(json.dumps(
            {"latent_cache_key": cache.key, "scale_factor": cache.scale_factor, "latent_norm": cache.latent_norm,
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
