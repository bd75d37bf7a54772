"""The diffusion worker under DeepSpeed ZeRO on 2 CPU ranks: grad accumulation, bf16, EMA under
ZeRO-3, and exact resume - a run interrupted after k steps (by the stop hook, or by a worker failure
that Ray Train's FailureConfig restarts) ends with bit-identical U-Net, EMA and loss curve."""
import json
import os
from itertools import islice

import numpy as np
import pytest
import torch

from cluster.train import consolidate_zero_checkpoint, fit
from pipelines.config import DiffusionConfig, to_dict
from pipelines.shards import npy_bytes, write_shard
from pipelines.train_diffusion import (CKPT_TAG, LOSSES, META, ResumeMismatchError, check_resume,
                                       diffusion_worker, latest_checkpoint, training_fingerprint)

UNET = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "num_heads": 2, "context_dim": 8, "in_channels": 4, "out_channels": 4}
L, D = 3, 8   # text tokens, width


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """4 latent shards of 16 samples (2 shards a rank) and the empty caption's states."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    urls = []
    for s in range(4):
        rows = [{"__key__": f"s{s}{i:03d}",
                 "mean.npy": npy_bytes(rng.normal(0.5, 1.0, (4, 8, 8)).astype(np.float32)),
                 "std.npy": npy_bytes(np.full((4, 8, 8), 0.1, np.float32)),
                 "text.npy": npy_bytes(rng.normal(0, 1, (L, D)).astype(np.float16)),
                 "mask.npy": npy_bytes(np.array([True, True, i % 2 == 0]))} for i in range(16)]
        write_shard(root / f"{s:03d}.tar", rows)
        urls.append(str(root / f"{s:03d}.tar"))
    null = root / "null.npz"
    np.savez(null, states=np.zeros((L, D), np.float32), mask=np.array([True, False, False]))
    return urls, str(null)


def _loop_cfg(latents, **kw) -> dict:
    urls, null = latents
    loop_only = {k: kw.pop(k) for k in list(kw) if k.startswith("_") or k == "resume_from"}
    from models.unet import UNetConfig
    cfg = DiffusionConfig(**{"unet": UNetConfig.from_dict(UNET), "max_steps": 6, "batch_size": 4, "lr": 3e-3,
                             "warmup_steps": 2, "grad_clip": 0.5, "ema_decay": 0.9, "log_every": 1,
                             "checkpoint_every": 0, "grad_accum": 2, "num_workers": 2, "precision": "fp32", **kw})
    return {**to_dict(cfg), "use_gpu": False, "train_urls": urls, "null_text_file": null,
            "scale_factor": 0.8, "tracking_uri": None, "run_id": None, "resume_from": None, **loop_only}


def _fit(tmp, name, c, max_failures=0):
    return fit(diffusion_worker, c, num_workers=2, use_gpu=False, storage_path=str(tmp), name=name,
               env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}, max_failures=max_failures)


def _outcome(result) -> dict:
    """Consolidated U-Net, EMA U-Net and loss curve of a run's last checkpoint."""
    from models.checkpoint import load_state
    with result.checkpoint.as_directory() as d:
        state = consolidate_zero_checkpoint(d, CKPT_TAG)
        unet = {k.removeprefix("denoiser.net."): v for k, v in state.items() if k.startswith("denoiser.net.")}
        ema = load_state(os.path.join(d, "unet_ema"))[1] if os.path.isdir(os.path.join(d, "unet_ema")) else None
        return {"unet": unet, "ema": ema, "losses": np.load(os.path.join(d, LOSSES)),
                "meta": json.loads(open(os.path.join(d, META)).read()), "metrics": result.metrics}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


# ---------------------------------------------------------------- fast: no Ray

@pytest.mark.parametrize("preload", [2 ** 31, 0])
def test_rank_batches_start_continues_the_sequence(latents, preload):
    # 2 shards of 16 for this rank, batches of 4: 8 a epoch; start=11 is epoch 1, batch 3.
    from pipelines.train_diffusion import latent_batches
    urls, _ = latents
    whole = list(islice(latent_batches(urls, 1, 2, 4, 0, preload), 14))
    for start in (0, 3, 8, 11):
        tail = list(islice(latent_batches(urls, 1, 2, 4, 0, preload, start=start), 14 - start))
        assert all(torch.equal(x["mean"], y["mean"]) and torch.equal(x["mask"], y["mask"])
                   for x, y in zip(whole[start:], tail, strict=True))


def test_fingerprint_mismatch_names_the_fields(latents, tmp_path):
    c = _loop_cfg(latents)
    fp, part = training_fingerprint(c)
    (tmp_path / META).write_text(json.dumps({"step": 3, "fingerprint": fp, "config": part}))
    assert check_resume(str(tmp_path), {**c, "max_steps": 100, "log_every": 7})["step"] == 3  # not training-relevant
    other = {**c, "batch_size": 8, "unet": {**c["unet"], "channels": 32}}
    with pytest.raises(ResumeMismatchError, match=r"batch_size \(4 -> 8\).*unet\.channels \(16 -> 32\)"):
        check_resume(str(tmp_path), other)
    with pytest.raises(ResumeMismatchError, match="no meta.json"):
        check_resume(str(tmp_path / "missing"), c)


def test_resume_refuses_a_checkpoint_past_max_steps(latents, tmp_path):
    """Lowering max_steps below a finished run's step must not hand back the longer run as the
    shorter one (the stage used to, labelled with the longer run's step)."""
    c = _loop_cfg(latents)
    fp, part = training_fingerprint(c)
    (tmp_path / META).write_text(json.dumps({"step": 5, "fingerprint": fp, "config": part}))
    assert check_resume(str(tmp_path), {**c, "max_steps": 5})["step"] == 5     # finished: reused as is
    with pytest.raises(ResumeMismatchError, match=r"diffusion\.max_steps: 4 is below step 5 .*at least 5"):
        check_resume(str(tmp_path), {**c, "max_steps": 4})


# ---------------------------------------------------------------- Ray Train, 2 CPU ranks

def test_zero2_bf16_grad_accum_saves_and_consolidates(ray_local, latents, tmp_path):
    # Default suite: ZeRO-2, bf16, 2 micro-batches per optimizer step, clipping, EMA, periodic checkpoints.
    c = _loop_cfg(latents, zero_stage=2, precision="bf16", max_steps=3, checkpoint_every=2)
    res = _fit(tmp_path, "z2bf16", c)
    out = _outcome(res)
    m = out["metrics"]
    assert m["step"] == 3 and m["optimizer_steps"] == 3      # the step counter counts optimizer steps
    assert m["bf16"] == 1.0                                  # bf16 autocast in the engine
    assert m["micro_batches"] == 6 == out["meta"]["micro_batches_per_rank"]   # data: 2 per step
    assert len(out["losses"]) == 3 and np.all(np.isfinite(out["losses"]))
    assert all(torch.isfinite(v).all() for v in out["unet"].values())
    from models.unet import UNet, UNetConfig
    net = UNet(UNetConfig.from_dict(UNET))
    net.load_state_dict(out["unet"], strict=True)
    net.load_state_dict(out["ema"], strict=True)
    assert out["ema"]["out_conv.weight"].dtype == torch.float32   # the EMA is fp32 under bf16 training
    assert _max_diff(out["ema"], out["unet"]) > 0               # and it lags the weights
    assert len(latest_checkpoint(str(tmp_path), "z2bf16")) and json.loads(
        open(os.path.join(latest_checkpoint(str(tmp_path), "z2bf16"), META)).read())["step"] == 3


def test_cosine_lr_reaches_the_optimizer_and_is_fingerprinted(ray_local, latents, tmp_path):
    """lr_schedule cosine (no DeepSpeed scheduler; the loop sets the rate): warm-up 1, 3 steps at
    rates lr, lr/2, 0. The last step's rate 0 leaves the U-Net exactly as step 2 left it; a cosine
    run's max_steps is fingerprinted (its decay depends on it), a constant run's is not."""
    from models.lr import warmup_cosine
    assert [warmup_cosine(s, 3e-3, 1, 3) for s in (1, 2, 3)] == pytest.approx([3e-3, 1.5e-3, 0.0], abs=1e-12)
    c = _loop_cfg(latents, lr_schedule="cosine", warmup_steps=1, max_steps=3, checkpoint_every=1)
    res = _fit(tmp_path, "cosine", c)
    assert res.metrics["step"] == 3 and res.metrics["lr"] == 0.0
    by_step = {}
    for ckpt, metrics in res.best_checkpoints:
        with ckpt.as_directory() as d:
            state = consolidate_zero_checkpoint(d, CKPT_TAG)
            by_step[metrics["step"]] = ({k: v for k, v in state.items() if k.startswith("denoiser.net.")}, metrics)
    assert sorted(by_step) == [1, 2, 3]
    assert [by_step[s][1]["lr"] for s in (1, 2, 3)] == pytest.approx([3e-3, 1.5e-3, 0.0], abs=1e-12)
    assert _max_diff(by_step[2][0], by_step[3][0]) == 0        # rate 0: the weights did not move
    assert _max_diff(by_step[2][0], {k: torch.zeros_like(v) for k, v in by_step[2][0].items()}) > 0
    const = _fit(tmp_path, "constant", _loop_cfg(latents, max_steps=3, warmup_steps=1))
    assert const.metrics["lr"] == pytest.approx(3e-3)          # DeepSpeed's WarmupLR: constant after warm-up
    assert training_fingerprint({**c, "max_steps": 4})[0] != training_fingerprint(c)[0]
    const_c = _loop_cfg(latents, max_steps=3)
    assert training_fingerprint({**const_c, "max_steps": 4})[0] == training_fingerprint(const_c)[0]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, latents, tmp_path_factory):
    runs = {}

    def get(stage, precision="fp32", lr_schedule="constant"):
        key = (stage, precision, lr_schedule)
        if key not in runs:
            c = _loop_cfg(latents, zero_stage=stage, precision=precision, lr_schedule=lr_schedule)
            name = f"full{stage}{precision}{lr_schedule}"
            runs[key] = _outcome(_fit(tmp_path_factory.mktemp(name), name, c))
        return runs[key]
    return get


@pytest.mark.slow
# bf16 autocast too under ZeRO-3: exact only because gradients are reduced in fp32 (with bf16
# reduction, DeepSpeed's default for Linear/Conv, a resumed run drifted by ~1e-5 from step 5).
# The cosine schedule's rate is recomputed from the step instead of restored with DeepSpeed's state.
@pytest.mark.parametrize("stage, precision, lr_schedule",
                         [(2, "fp32", "constant"), (3, "fp32", "constant"), (3, "bf16", "constant"),
                          (2, "fp32", "cosine")])
def test_interrupted_and_resumed_run_is_exact(ray_local, latents, tmp_path, uninterrupted, stage, precision,
                                              lr_schedule):
    full = uninterrupted(stage, precision, lr_schedule)
    assert full["metrics"]["step"] == 6 and len(full["losses"]) == 6
    kw = dict(zero_stage=stage, precision=precision, lr_schedule=lr_schedule)
    # 1. The stop hook ends the run after its step-2 checkpoint; a new run resumes from that path.
    first = _fit(tmp_path, "part1", _loop_cfg(latents, stop_after_steps=2, **kw))
    assert first.metrics["step"] == 2
    ckpt = latest_checkpoint(str(tmp_path), "part1")
    resumed = _outcome(_fit(tmp_path, "part2", _loop_cfg(latents, resume_from=ckpt, **kw)))
    # 2. A worker fails after the step-3 checkpoint; Ray Train restarts the group from it.
    restarted = _outcome(_fit(tmp_path, "failed", _loop_cfg(latents, checkpoint_every=3, _fail_at_step=3, **kw),
                              max_failures=1))
    for run in (resumed, restarted):
        assert run["metrics"]["step"] == 6
        assert np.array_equal(run["losses"], full["losses"])
        assert _max_diff(run["unet"], full["unet"]) == 0
        assert _max_diff(run["ema"], full["ema"]) == 0
    # 3. Resuming with another training config fails before any step, naming the field.
    with pytest.raises(Exception, match=r"differs in: batch_size \(4 -> 2\)"):
        _fit(tmp_path, "wrong", _loop_cfg(latents, batch_size=2, resume_from=ckpt, **kw))


@pytest.mark.slow
def test_zero3_ema_matches_zero2(uninterrupted):
    z2, z3 = uninterrupted(2), uninterrupted(3)
    # Same seed, data and updates; only the reduction order of the gradients differs, which Adam
    # turns into ~1e-4 weight differences where gradients are near zero (measured on a 2-core x86
    # VM: U-Net 9.3e-5, EMA 5.7e-5, losses equal). A wrong gather (slices swapped, padding kept, one
    # rank's slice only) would be off by the weights' own size (~1e-1); EMA vs weights: 2.1e-3.
    assert _max_diff(z3["unet"], z2["unet"]) < 5e-4
    assert _max_diff(z3["ema"], z2["ema"]) < 5e-4
    assert _max_diff(z3["ema"], z3["unet"]) > 1e-3   # the EMA is not just the weights
    assert np.allclose(z3["losses"], z2["losses"], atol=1e-4)


@pytest.mark.slow
def test_compiled_unet_trains_like_eager(ray_local, latents, tmp_path, uninterrupted):
    """diffusion.compile under ZeRO-2: the same run as eager up to the compiled kernels' float
    reordering, a checkpoint with the eager module's keys, resumable without compiling."""
    eager = uninterrupted(2)
    res = _fit(tmp_path, "compiled", _loop_cfg(latents, zero_stage=2, compile=True))
    compiled = _outcome(res)
    assert compiled["metrics"]["step"] == 6
    # Adam turns reordered sums into ~1e-4 weight differences where gradients are near zero (as
    # ZeRO-3 vs ZeRO-2 above); a net that skipped a layer or a gradient would be off by ~1e-1.
    assert compiled["metrics"]["compiled_graphs"] >= 1          # it did compile (eager: no such metric)
    assert "compiled_graphs" not in eager["metrics"]
    assert np.allclose(compiled["losses"], eager["losses"], atol=1e-6)   # measured 3e-8
    assert _max_diff(compiled["unet"], eager["unet"]) < 5e-4     # same keys, no _orig_mod. prefix (2.5e-4)
    assert _max_diff(compiled["ema"], eager["ema"]) < 5e-4       # (1.6e-4; EMA vs weights: 2.1e-3)
    ckpt = latest_checkpoint(str(tmp_path), "compiled")
    check_resume(ckpt, _loop_cfg(latents, zero_stage=2))         # compile is not part of the fingerprint


@pytest.mark.slow
def test_stage_reentry_continues_from_its_checkpoint(ray_local, latents, tmp_path):
    # `ldmflow run` re-entering a half-finished diffusion stage: the first attempt stops after its
    # step-2 checkpoint (no artifact); the second finds that checkpoint under the same Ray run name
    # and trains steps 3-4 only, then exports unet/ and unet_ema/.
    import dataclasses
    from models.checkpoint import load_state
    from models.unet import UNetConfig
    from models.text import TextEncoderConfig
    from pipelines.config import CacheConfig, PipelineConfig, TrackingConfig
    from pipelines.stage import LatentCacheArtifact, StageContext
    from pipelines.tracking import Tracker
    from pipelines.train_diffusion import train_diffusion
    urls, null = latents
    known = {f.name for f in dataclasses.fields(LatentCacheArtifact)}
    cache = LatentCacheArtifact(**{k: v for k, v in {
        "directory": str(tmp_path), "key": "k", "train_urls": urls, "num_samples": 64, "text_encoder_dir": "",
        "text_encoder_hash": "", "null_text_file": null, "scale_factor": 0.8, "latent_shape": [4, 8, 8],
        "text_shape": [L, D], "autoencoder_hash": "a", "autoencoder_version": None, "dataset_hash": "d"}.items()
        if k in known})

    def stage(**kw):
        dcfg = DiffusionConfig(unet=UNetConfig.from_dict(UNET), max_steps=4, batch_size=4, log_every=1,
                               checkpoint_every=0, **kw)
        text = TextEncoderConfig(width=D, layers=1, heads=2, context_length=L)
        cfg = PipelineConfig(diffusion=dcfg, cache=CacheConfig(text_encoder=text),
                             tracking=TrackingConfig(register_models=False))
        tracker = Tracker.embedded(tmp_path, None, None, "resume")
        ctx = StageContext(config=cfg, output_dir=tmp_path, tracker=tracker,
                           pipeline_run_id=tracker.start_run("p"), code_version="test",
                           env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]})
        return train_diffusion(dcfg, cache, ctx)

    with pytest.raises(RuntimeError, match="stopped after step 2 of 4"):
        stage(stop_after_steps=2)
    art = stage()
    assert art.metrics["step"] == 4
    from mlflow.tracking import MlflowClient
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(art.run_id).data.tags
    assert "checkpoint_" in tags["ldmflow.resumed_from"]
    for sub in ("unet", "unet_ema"):
        cfg_dict, state, extra = load_state(os.path.join(art.directory, sub))
        assert extra["steps"] == 4 and all(torch.isfinite(v).all() for v in state.values())
