"""The `train_baseline` stage: any family of models/baselines under Ray Train, tracked like the
main pipeline's stages (dataset hash, config, code version, registry version).

Data parallelism without DDP (families own their train_step, a GAN steps two optimizers): every
rank starts from the same initial weights (same seed), gradients are averaged across ranks before
each optimizer step (the contract's `sync_grads`) and floating-point buffers (BatchNorm statistics,
EMA codebooks) after it, so replicas stay identical. Step 0 runs on rank 0's batch on every rank:
data-dependent initialisation (Glow's actnorm) then sees one batch everywhere.

Budget: `max_cpu_seconds` stops training once the CPU time a worker process spent in training steps
(all its threads; max over ranks, agreed through one all_reduce per step) passes it, for
comparisons at an equal CPU budget that other work on the machine does not distort. Checkpoints
hold the weights, every optimizer, the step, the elapsed training time and each rank's RNG, so a
restarted worker group resumes exactly (the data position is the step).
"""
from __future__ import annotations

import json
import os
import shutil
import time

from cluster.train import (META, CpuBudget, average_buffers, average_gradients, barrier_report_dir, checked_resume_meta,
                           latest_checkpoint, report, resume_checkpoint, world_info)
from pipelines.config import BaselineStageConfig, loop_fingerprint, to_dict
from pipelines.lineage import dir_hash
from pipelines.stage import BaselineArtifact, DatasetArtifact, StageContext
from pipelines.tracking import TAG, MetricLogger

MODEL_DIR = "model"            # in the final checkpoint and the stage dir: save_baseline's directory
GRID_FILE = "samples.png"
GRID_IMAGES = 16
CHECKPOINTS_KEPT = 2
# Loop-config keys that do not change what is trained (where it logs, how it is resumed).
NOT_FINGERPRINTED = {"tracking_uri", "run_id", "resume_from", "use_gpu", "log_every", "max_failures",
                     "checkpoint_every", "threads_per_worker"}


def training_fingerprint(c: dict) -> tuple[str, dict]:
    return loop_fingerprint(c, NOT_FINGERPRINTED)


def _save(d: str, model, opts, step: int, elapsed: tuple[float, float], c: dict, rank: int, world: int) -> None:
    import torch
    torch.save({"rng": torch.get_rng_state()}, os.path.join(d, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save({"model": model.state_dict(), "opts": {k: o.state_dict() for k, o in opts.items()}},
                   os.path.join(d, "state.pt"))
        fp, part = training_fingerprint(c)
        with open(os.path.join(d, META), "w") as f:
            json.dump({"step": step, "elapsed": elapsed[0], "cpu": elapsed[1], "world": world, "fingerprint": fp, "config": part}, f)


def baseline_worker(c: dict) -> None:
    """Per-worker training loop: a plain function of its config dict."""
    import torch
    import torch.distributed as dist
    import ray.train.torch
    from models.baselines import build_baseline, save_baseline
    from pipelines.images import grid, to_pil
    from pipelines.train_autoencoder import image_batches

    rank, world = world_info()
    torch.set_num_threads(max(1, c.get("threads_per_worker", 1)))
    device = ray.train.torch.get_device()
    torch.manual_seed(c["seed"])      # the same initial weights on every rank
    model = build_baseline(c["family"], c["model"]).to(device)
    opts = model.make_optimizers()
    step, elapsed, cpu = 0, 0.0, 0.0   # training wall seconds and CPU seconds (max over ranks)
    with resume_checkpoint(c.get("resume_from")) as resume_dir:
        if resume_dir is not None:
            fp, part = training_fingerprint(c)
            meta = checked_resume_meta(resume_dir, fp, part, "baseline")
            state = torch.load(os.path.join(resume_dir, "state.pt"), map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            for k, o in opts.items():
                o.load_state_dict(state["opts"][k])
            rng = os.path.join(resume_dir, f"rng_rank{rank}.pt")
            if meta["world"] == world and os.path.isfile(rng):
                torch.set_rng_state(torch.load(rng, weights_only=True)["rng"])
            step, elapsed, cpu = meta["step"], meta["elapsed"], meta["cpu"]
        else:
            torch.manual_seed(c["seed"] * 1000 + rank + 1)   # per-rank sampling noise from here on
    log = MetricLogger(c.get("tracking_uri"), c.get("run_id")) if rank == 0 else None

    def all_reduce_sum(t):
        if world > 1:
            dist.all_reduce(t)
        return t

    def sync_grads(params):
        average_gradients(params, world)

    closed = None
    fit_seconds, fit_cpu = 0.0, 0.0
    if step == 0:
        t0, c0 = time.perf_counter(), time.process_time()
        batches = image_batches(c["train_urls"], rank, world, c["batch_size"], c["resolution"], c["seed"],
                                repeat=False)
        if c["fit_batches"]:
            batches = (b for i, b in zip(range(c["fit_batches"]), batches))
        closed = model.fit_closed_form((b.to(device) for b in batches), all_reduce=all_reduce_sum)
        fit_seconds, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    max_steps, every, budget = c["max_steps"], c["checkpoint_every"], c["max_cpu_seconds"]
    running, n_run, images = {}, 0, 0
    if closed is None:
        batches = image_batches(c["train_urls"], rank, world, c["batch_size"], c["resolution"], c["seed"],
                                preload_max_bytes=c["preload_max_gb"] * 2 ** 30, start=step)
        model.train()
        clock = CpuBudget(budget, used=cpu, world=world, wall=elapsed)
        while step < max_steps and not clock.exhausted:
            with clock.step():
                x = next(batches).to(device)
                if step == 0 and world > 1:
                    dist.broadcast(x, 0)   # data-dependent init sees one batch on every rank
                logs = model.train_step(x, opts, step, sync_grads)
                average_buffers(model, world)
            step += 1
            images += x.shape[0] * world
            elapsed, cpu = clock.wall, clock.used
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + float(v)
            n_run += 1
            out_of_time = clock.exhausted
            if log and (step % c["log_every"] == 0 or step == max_steps or out_of_time):
                log.log({f"train/{k}": v / n_run for k, v in running.items()}, step)
                running, n_run = {}, 0
            if out_of_time:
                break
            if every and step % every == 0 and step < max_steps:
                with barrier_report_dir() as d:
                    _save(d, model, opts, step, (elapsed, cpu), c, rank, world)
                    report({"step": step, "elapsed": elapsed, "cpu": cpu}, d)
            fail_at = c.get("_fail_at_step", 0)   # test hook: one simulated worker failure
            marker = os.path.join(c.get("_marker_dir", ""), "failed")
            if fail_at and step == fail_at and rank == world - 1 and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(2.0)   # let the controller register the checkpoint first
                raise RuntimeError(f"_fail_at_step: simulated worker failure after step {step}")
    model.eval()
    metrics = {"step": step, "train_seconds": elapsed + fit_seconds, "train_cpu_seconds": cpu + fit_cpu,
               "closed_form": float(closed is not None)}
    if closed is not None:
        metrics.update({f"fit/{k}": float(v) for k, v in closed.items()})
    elif elapsed > 0 and images:
        metrics["train/images_per_s"] = images / elapsed
    with barrier_report_dir() as d:
        _save(d, model, opts, step, (elapsed, cpu), c, rank, world)
        if rank == 0:
            save_baseline(model, os.path.join(d, MODEL_DIR), extra={"steps": step, "train_seconds": elapsed + fit_seconds})
            with torch.no_grad():
                s = model.sample(GRID_IMAGES, generator=torch.Generator(device=device).manual_seed(c["seed"]))
            grid([to_pil(im) for im in s.float().cpu()], scale=2).save(os.path.join(d, GRID_FILE))
            if log:
                log.log({k: v for k, v in metrics.items()}, step)
        report(metrics, d)


def baseline_loop_config(cfg: BaselineStageConfig, model: dict, data: DatasetArtifact) -> dict:
    """The worker's config dict: the stage config as plain data plus what it reads."""
    c = to_dict(cfg)
    c.update({"model": model, "resolution": model["resolution"], "train_urls": data.train_urls})
    return c


def train_baseline(cfg: BaselineStageConfig, model: dict, data: DatasetArtifact, ctx: StageContext,
                   stage_name: str = "train_baseline") -> BaselineArtifact:
    """Train baseline `cfg.family` with model config `model` (the family's Config fields,
    PipelineConfig.baseline_model) on the dataset. Re-entering a half-finished stage resumes from
    its last checkpoint (the Ray run is named after the training fingerprint)."""
    out = ctx.stage_dir(stage_name)
    base = baseline_loop_config(cfg, model, data)
    fp, _ = training_fingerprint(base)
    name = f"baseline-{cfg.family}-{fp}"
    resume_from = latest_checkpoint(str(ctx.ray_storage), name)
    tags = {TAG["dataset_hash"]: data.dataset_hash, TAG["upstream_runs"]: data.run_id,
            "ldmflow.family": cfg.family, "ldmflow.resumed_from": resume_from}
    with ctx.stage_run(stage_name, cfg, tags) as run_id:
        ctx.tracker.log_params(run_id, {"model": model})
        loop_cfg = {**base, "use_gpu": ctx.config.cluster.use_gpu, "tracking_uri": ctx.tracker.uri,
                    "run_id": run_id, "resume_from": resume_from}
        result, metrics = ctx.train(baseline_worker, loop_cfg, cfg.num_workers, name,
                                    max_failures=cfg.max_failures, num_to_keep=CHECKPOINTS_KEPT)
        model_dir = ctx.fresh_dir(out / MODEL_DIR)
        with result.checkpoint.as_directory() as d:
            shutil.copytree(f"{d}/{MODEL_DIR}", model_dir)
            shutil.copy(f"{d}/{GRID_FILE}", out / GRID_FILE)
        h = dir_hash(model_dir)
        ctx.tracker.log_metrics(run_id, metrics, step=int(metrics.get("step", 0)))
        ctx.tracker.log_artifacts(run_id, model_dir, "baseline")
        ctx.tracker.log_artifact(run_id, out / GRID_FILE, "images")
        lineage = {TAG["dataset_hash"]: data.dataset_hash, "ldmflow.baseline_hash": h}
        from pipelines.pyfunc import KIND_TAG
        version = None
        if ctx.config.tracking.register_models:
            version = ctx.tracker.register_model(
                f"{ctx.config.tracking.model_prefix}-baseline-{cfg.family}", run_id, "baseline",
                aliases=[ctx.config.name], tags={**lineage, KIND_TAG: "baseline"},
                description=f"{cfg.family} baseline (models/baselines/); load with models.baselines.load_baseline")
        ctx.tracker.set_tags(run_id, lineage)
        return BaselineArtifact(directory=str(model_dir), family=cfg.family, baseline_hash=h,
                                dataset_hash=data.dataset_hash, model_version=version, run_id=run_id,
                                metrics=metrics)
