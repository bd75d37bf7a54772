"""Ray Train launch: a per-worker loop (a plain function of its config) on N workers, DDP or
DeepSpeed, with checkpoints persisted by Ray and handed back as a local directory."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["fit", "deepspeed_config", "worker_context", "report", "barrier_report_dir",
           "world_info", "consolidate_zero_checkpoint", "resume_checkpoint", "run_checkpoints",
           "ResumeMismatchError", "checked_resume_meta", "latest_checkpoint",
           "checkpoint_at", "average_gradients", "average_buffers", "CpuBudget"]


def fit(loop: Callable[[dict], None], config: dict, *, num_workers: int, use_gpu: bool,
        storage_path: str, name: str, env: dict[str, str] | None = None, max_failures: int = 0,
        num_to_keep: int | None = None):
    """Run `loop(config)` on `num_workers` Ray Train workers (torch process group made by Ray:
    gloo on CPU, nccl on GPU). Returns the ray.train Result; its `.checkpoint` is the last one
    reported (every rank's files merged).

    max_failures: after a worker fails, Ray Train restarts the whole group this many times; the
    loop then finds the last reported checkpoint in `ray.train.get_checkpoint()`. The same happens
    when `name` is run again under the same `storage_path` (Ray Train restores the run's checkpoint
    list), which is how a re-entered stage continues. num_to_keep: checkpoints kept on disk (None = all).

    storage_path: a local directory or a URL (s3://bucket/prefix): Ray Train then persists every
    rank's checkpoint files there through a pyarrow filesystem (cluster.storage.pyarrow_filesystem,
    which carries the S3 endpoint to the workers), and `.checkpoint.as_directory()` downloads.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.storage import endpoint_env, is_url, pyarrow_filesystem
    if is_url(storage_path):
        fs, path = pyarrow_filesystem(storage_path)
        storage = {"storage_path": path, "storage_filesystem": fs}
        env = {**endpoint_env(), **(env or {})}   # workers reading s3:// data reach the same endpoint
    else:
        storage = {"storage_path": os.path.abspath(storage_path)}
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, **storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             worker_runtime_env={"env_vars": dict(env or {})}),
    )
    return trainer.fit()


def run_checkpoints(storage_path: str, name: str) -> list[str]:
    """The checkpoint directories Ray Train persisted for run `name` under `storage_path`, oldest
    first by name (Ray names them checkpoint_<timestamp>); [] when the run never reported one.
    With a URL storage_path the checkpoints are URLs too (listed through fsspec)."""
    from cluster.storage import is_url, join, listdir
    run_dir = join(storage_path if is_url(storage_path) else os.path.abspath(storage_path), name)
    return [join(run_dir, d) for d in listdir(run_dir, dirs_only=True) if d.startswith("checkpoint_")]


def checkpoint_at(path: str):
    """A ray.train Checkpoint for a checkpoint directory at a local path or a URL."""
    from ray.train import Checkpoint

    from cluster.storage import pyarrow_filesystem
    fs, p = pyarrow_filesystem(path)
    return Checkpoint(p, filesystem=fs)


@contextmanager
def resume_checkpoint(explicit: str | None = None) -> Iterator[str | None]:
    """Inside a worker: the directory to resume from, or None to start fresh.

    Ray Train's own checkpoint comes first: after a worker failure (FailureConfig) or when the run
    name was run before it is the newest state. Otherwise `explicit`, a checkpoint directory the
    driver chose (local, or a URL: downloaded to a temporary directory for the block)."""
    import ray.train

    from cluster.storage import is_url
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and explicit is not None and is_url(explicit):
        ckpt = checkpoint_at(explicit)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            yield d
        return
    yield explicit


def world_info() -> tuple[int, int]:
    """(rank, world_size) inside a Ray Train worker."""
    import ray.train
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def report(metrics: dict, directory: str | None = None) -> None:
    """Every rank calls this together: each rank's files in `directory` land in one checkpoint."""
    import ray.train
    from ray.train import Checkpoint
    ckpt = Checkpoint.from_directory(directory) if directory else None
    ray.train.report(metrics, checkpoint=ckpt)


@contextmanager
def barrier_report_dir() -> Iterator[str]:
    """A temporary directory each rank writes its part of a checkpoint into, removed afterwards."""
    d = tempfile.mkdtemp(prefix="ldmflow-ckpt-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def average_gradients(params, world: int) -> None:
    """Average .grad of `params` over ranks with one flat all_reduce (for modules outside DDP)."""
    import torch
    import torch.distributed as dist
    params = [p for p in params if p.grad is not None]
    if world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def average_buffers(module, world: int) -> None:
    """Average the floating-point buffers of `module` over ranks with one all_reduce (BatchNorm
    running statistics, EMA codebooks): replicas trained on different batches stay identical."""
    import torch
    import torch.distributed as dist
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if world == 1 or not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[i:i + n].view_as(b).to(b.dtype))
        i += n


class CpuBudget:
    """A training budget in CPU seconds of each worker process (all its threads; time.process_time),
    the currency of equal-budget comparisons: unlike wall time it does not shrink when other work
    shares the machine. Every rank adds the slowest rank's step time (an all_reduce MAX), so all
    ranks agree on the step where the budget runs out and stop together (no collective hangs).
    `limit` 0 counts the time but never stops. `used` is saved in checkpoints and restored on resume.

        budget = CpuBudget(c["max_cpu_seconds"], used=meta.get("cpu_seconds", 0.0), world=world)
        while step < max_steps and not budget.exhausted:
            with budget.step():
                ...one optimizer step...
    """

    def __init__(self, limit: float, used: float = 0.0, world: int = 1, wall: float = 0.0):
        if limit < 0:
            raise ValueError(f"max_cpu_seconds: expected >= 0, got {limit}")
        self.limit, self.used, self.world, self.wall = float(limit), float(used), world, float(wall)

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.used >= self.limit

    @contextmanager
    def step(self):
        import time
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        dt = [time.perf_counter() - t0, time.process_time() - c0]
        if self.world > 1:
            import torch
            import torch.distributed as dist
            t = torch.tensor(dt, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slowest rank's clocks: every rank agrees
            dt = t.tolist()
        self.wall += dt[0]
        self.used += dt[1]

    def planned_steps(self, step: int, max_steps: int) -> int:
        """The step count a step-based LR schedule should decay over: max_steps, or under a budget
        the steps it will reach at the rate so far (so a cosine reaches its floor as the budget runs
        out). A pure function of (step, used), both checkpointed: a resumed run recomputes it."""
        if not self.limit or step == 0 or self.used <= 0:
            return max_steps
        return max(step + 1, min(max_steps, int(step * self.limit / self.used)))


def deepspeed_config(*, batch_size: int, lr: float, weight_decay: float, warmup_steps: int,
                     grad_clip: float, zero_stage: int, precision: str, on_gpu: bool,
                     grad_accum: int = 1, lr_scheduler: bool = True) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO `zero_stage`. On CPU torch's AdamW, with torch's own fused CPU
    kernel (models/optim.py: no DeepSpeed op to JIT-compile, one pass per tensor instead of the
    for-loop's six); on GPU DeepSpeed's FusedAdam. lr_scheduler=False leaves out DeepSpeed's
    warm-up scheduler: the caller sets the optimizer's rate itself every step."""
    import torch
    from models.optim import fused_supported
    adamw: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    if not on_gpu:
        adamw["torch_adam"] = True
        if fused_supported([torch.zeros(1)]):
            adamw["fused"] = True    # passed through to torch.optim.AdamW
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "AdamW", "params": adamw},
        "steps_per_print": 10 ** 9,   # we log to MLflow ourselves
        "wall_clock_breakdown": False,
    }
    if lr_scheduler:
        cfg["scheduler"] = {"type": "WarmupLR",
                            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                       "warmup_num_steps": max(1, warmup_steps), "warmup_type": "linear"}}
    if not on_gpu and zero_stage > 0:
        # contiguous_gradients copies every gradient into one preallocated buffer as backward
        # produces it (against fragmentation of GPU memory); on the CPU those per-parameter copies
        # are pure overhead: the quickstart's ZeRO-2 steps ran 47 s -> 37 s per 300 without it, the
        # speed of ZeRO-0 (38 s), side by side.
        cfg["zero_optimization"]["contiguous_gradients"] = False
    if grad_clip > 0:
        cfg["gradient_clipping"] = grad_clip
    if precision == "bf16":
        # torch autocast inside the engine, not DeepSpeed's "bf16" mode: the module keeps fp32
        # weights (the optimizer steps them directly, no bf16 copy to sync), convs and matmuls run
        # in bf16, norms, softmax and the loss in fp32: the path benchmarks/unet_speed.py times
        # (1.4-1.5x diffusers' step). Gradients are reduced in fp32: with DeepSpeed's default
        # (Linear/conv gradients reduced in bf16, half the traffic) a ZeRO-3 run resumed from a
        # checkpoint drifted from the uninterrupted one (tests/test_resume.py), and exact resume
        # is worth more than the traffic.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if zero_stage == 3:
        # Gather the 16-bit weights on save so a consolidated copy is cheap to produce.
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def consolidate_zero_checkpoint(checkpoint_dir: str, tag: str) -> dict:
    """fp32 state dict from every rank's ZeRO shards (DeepSpeed's zero_to_fp32), or under ZeRO
    stage 0 from the one whole copy of the module rank 0 saved."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt")):
        # Stage 0 writes no ZeRO shards, and zero_to_fp32 (which reads only those) fails on it
        # with a TypeError: the module's state dict is in the model states file, unsharded.
        path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint_dir: no DeepSpeed checkpoint {tag!r} in {checkpoint_dir}")
        module = torch.load(path, map_location="cpu", weights_only=True)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


# ----------------------------------------------------------------------------------------------
# Resumable checkpoints shared by the training stages: each writes meta.json LAST (rank 0), with
# its step, a fingerprint of the training config and the fingerprinted config itself.

META = "meta.json"


class ResumeMismatchError(ValueError):
    """A checkpoint was written by another training config; names the fields that differ."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checked_resume_meta(checkpoint_dir: str, fingerprint: str, config_part: dict, what: str,
                        max_steps: int | None = None) -> dict:
    """The checkpoint's meta.json, after checking it was written by the training config whose
    fingerprint is given; ResumeMismatchError names every field that differs otherwise.

    max_steps: the steps this run asks for, where the fingerprint leaves them out (so a finished
    run can be continued to more steps). A checkpoint already past them cannot give the model at
    max_steps (it was not kept), and handing it back would label a longer run as the one asked
    for: ResumeMismatchError, naming `{what}.max_steps`."""
    from cluster.storage import isfile, read_text   # checkpoints may live at a URL (cluster.storage_uri)
    path = os.path.join(checkpoint_dir, META)
    if not isfile(path):
        raise ResumeMismatchError(f"resume: {checkpoint_dir} holds no {META}; not a {what} checkpoint")
    meta = json.loads(read_text(path))
    if meta.get("fingerprint") != fingerprint:
        old, new = _flat(meta.get("config", {})), _flat(config_part)
        diffs = [f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
                 for k in sorted(old.keys() | new.keys()) if old.get(k, "<absent>") != new.get(k, "<absent>")]
        raise ResumeMismatchError(
            f"resume: checkpoint {checkpoint_dir} (step {meta.get('step')}) was written by another training "
            f"config; differs in: {', '.join(diffs) or 'nothing visible (fingerprint version)'}. Restore "
            f"those settings, or train from scratch in a new output directory.")
    step = int(meta.get("step", 0))
    if max_steps is not None and step > max_steps:
        raise ResumeMismatchError(
            f"{what}.max_steps: {max_steps} is below step {step} of this training config's checkpoint "
            f"{checkpoint_dir}, and the model at step {max_steps} was not kept. Set max_steps to at least "
            f"{step} to continue from it, or train from scratch in a new output directory.")
    return meta


def latest_checkpoint(storage_path: str, name: str) -> str | None:
    """The highest-step complete checkpoint Ray Train persisted for run `name`, or None."""
    from cluster.storage import isfile, read_text   # storage_path may be a URL (cluster.storage_uri)
    best, best_step = None, -1
    for d in run_checkpoints(storage_path, name):
        meta = os.path.join(d, META)
        if isfile(meta):          # written last by rank 0: a complete checkpoint
            step = json.loads(read_text(meta)).get("step", -1)
            if step > best_step:
                best, best_step = d, step
    return best
