"""The autoencoder stage: KL and VQ through the Ray Train worker with the PatchGAN active, identical
replicas (the VQ codebook's EMA buffers included), validation metrics in MLflow, the LatentNorm
artifact contract, config errors, the VQ latent cache, and exact resume."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from models.autoencoder import AutoencoderConfig
from models.latent_norm import LatentNorm, latent_norm_from_moments, load_latent_norm
from models.losses import AutoencoderLossConfig
from models.quantize import QuantizerConfig
from pipelines.config import AutoencoderStageConfig, ConfigError, load_config, to_dict
from pipelines.shards import encode_png, write_shard
from pipelines.train_autoencoder import (MODEL_DIR, RFD_METRIC, STATE_DIR, ResumeMismatchError, autoencoder_worker,
                                         check_resume, training_fingerprint)

RES = 16
TINY_AE = {"resolution": RES, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
           "mid_attention": False, "z_channels": 4}
# 16 px images: a 2-layer PatchGAN (6x6 patches would need 32 px for 3 layers), 8 base filters.
TINY_LOSS = {"disc_num_layers": 2, "disc_ndf": 8, "disc_start": 2, "perceptual_weight": 0.0}


def _image(rng) -> Image.Image:
    """A coloured rectangle on a coloured background: cheap, varied images."""
    a = np.zeros((RES, RES, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    x0, y0 = rng.integers(0, RES // 2, 2)
    a[y0:y0 + RES // 2, x0:x0 + RES // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 train shards of 16 images (one per rank) and 1 validation shard of 8."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    urls = {}
    for split, n_shards, n in (("train", 2, 16), ("val", 1, 8)):
        urls[split] = []
        for s in range(n_shards):
            path = root / split / f"{s:03d}.tar"
            write_shard(path, [{"__key__": f"{split}{s}{i:03d}", "png": encode_png(_image(rng)),
                                "txt": "a shape"} for i in range(n)])
            urls[split].append(str(path))
    return urls


def _loop_cfg(shards, **kw) -> dict:
    hooks = {k: kw.pop(k) for k in list(kw) if k.startswith("_") or k in ("resume_from", "tracking_uri", "run_id")}
    family = kw.pop("family", "kl")
    loss = {**TINY_LOSS, **kw.pop("loss", {}), "family": family}
    model = AutoencoderConfig.from_dict({**TINY_AE, **({"double_z": False} if family == "vq" else {})})
    cfg = AutoencoderStageConfig(**{
        "family": family, "model": model, "loss": AutoencoderLossConfig.from_dict(loss),
        "quantizer": QuantizerConfig.from_dict({"code_dim": 4, **kw.pop("quantizer", {})}),
        "max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "num_workers": 2, "scale_batches": 2,
        "eval_images": 8, "eval_rfd": False, "ema_decay": 0.0, **kw})
    return {**to_dict(cfg), "resolution": RES, "train_urls": shards["train"], "val_urls": shards["val"],
            "use_gpu": False, "tracking_uri": None, "run_id": None, "resume_from": None, **hooks}


def _fit(tmp, name, c, max_failures=0):
    from cluster.train import fit
    return fit(autoencoder_worker, c, num_workers=c["num_workers"], use_gpu=False, storage_path=str(tmp),
               name=name, max_failures=max_failures)


def _replicas_equal(replica_dir, world):
    states = [torch.load(replica_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for k in states[0]:
            assert torch.equal(other[k], states[0][k]), k
    return states[0]


# ---------------------------------------------------------------- fast: no Ray

@pytest.mark.parametrize("kind", ["tensor", "channel"])
def test_latent_norm_round_trip_and_extra(kind):
    g = torch.Generator().manual_seed(0)
    # Channels with different offsets and scales: (B, C, h, w) = (64, 3, 4, 4).
    z = torch.randn(64, 3, 4, 4, generator=g) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1) \
        + torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1)
    zd = z.double()
    count = torch.full((3,), float(z[:, 0].numel()), dtype=torch.float64)
    norm = latent_norm_from_moments(kind, count, zd.sum((0, 2, 3)), zd.square().sum((0, 2, 3)))
    zn = norm.normalize(z)
    assert zn.shape == z.shape and zn.dtype == z.dtype
    if kind == "tensor":
        # LDM's scale_by_std: z * (1 / std over all elements), no shift.
        assert norm.scale_factor == pytest.approx(1.0 / float(zd.std(unbiased=False)), rel=1e-9)
        assert torch.allclose(zn, z * norm.scale_factor)
        assert float(zn.double().std(unbiased=False)) == pytest.approx(1.0, rel=1e-6)
    else:
        per_c = zn.double().transpose(0, 1).reshape(3, -1)
        assert torch.allclose(per_c.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(per_c.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
        with pytest.raises(ValueError, match="scale_factor"):
            norm.scale_factor
    assert torch.allclose(norm.denormalize(zn), z, atol=1e-5)
    extra = norm.to_extra()
    assert ("scale_factor" in extra) == (kind == "tensor")
    assert LatentNorm.from_extra(json.loads(json.dumps(extra))) == norm


def test_latent_norm_legacy_extra_and_errors(tmp_path):
    assert LatentNorm.from_extra({"scale_factor": 0.5}) == LatentNorm("tensor", (0.0,), (0.5,))
    with pytest.raises(ValueError, match="never measured"):
        LatentNorm.from_extra({"trained_steps": 3})
    with pytest.raises(ValueError, match="disagrees"):
        LatentNorm.from_extra({"latent_norm": {"kind": "tensor", "shift": [0.0], "scale": [2.0]}, "scale_factor": 1.0})
    with pytest.raises(ValueError, match="scale: expected finite numbers > 0"):
        LatentNorm("channel", (0.0, 0.0), (1.0, 0.0))
    with pytest.raises(ValueError, match="z: expected 2 channels"):
        LatentNorm("channel", (0.0, 0.0), (1.0, 1.0)).normalize(torch.zeros(1, 3, 2, 2))
    from models.autoencoder import AutoencoderKL, save_pretrained
    save_pretrained(AutoencoderKL(AutoencoderConfig.from_dict(TINY_AE)), tmp_path / "ae",
                    extra=LatentNorm("channel", (1.0, 0, 0, 0), (2.0, 1, 1, 1)).to_extra())
    assert load_latent_norm(tmp_path / "ae").shift == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("overrides, message", [
    (["autoencoder.family=vq", "autoencoder.quantizer.codebook_size=0"],
     "autoencoder.quantizer.codebook_size: expected a positive int, got 0"),
    (["autoencoder.model.ch_mult=[1, 2, 2, 2, 2, 2, 2]"],
     "autoencoder.model.resolution: 32 is not divisible by the downsampling factor 64"),
    (["autoencoder.family=vq", "autoencoder.quantizer.code_dim=3"],
     "autoencoder.quantizer.code_dim: expected model.z_channels (4), got 3"),
    (["autoencoder.loss.family=vq"], "autoencoder.loss.family: expected family ('kl'), got 'vq'"),
    (["autoencoder.kl_weight=1e-6"], "autoencoder.kl_weight: moved to autoencoder.loss.kl_weight"),
    (["autoencoder.latent_norm=pixel"], "autoencoder.latent_norm: expected one of 'tensor', 'channel'"),
    (["autoencoder.ema_decay=1.0"], "autoencoder.ema_decay: expected in [0, 1)"),
    (["autoencoder.disc_lr=0"], "autoencoder.disc_lr: expected > 0"),
    (["autoencoder.lr_schedule=linear"], "autoencoder.lr_schedule: expected one of 'constant', 'cosine'"),
    (["autoencoder.warmup_steps=-1"], "autoencoder.warmup_steps: expected"),
    (["autoencoder.loss.disc_start=-1"], "autoencoder.loss.disc_start: expected an int >= 0"),
    (["autoencoder.loss.disc_loss=wgan"], "autoencoder.loss.disc_loss: expected one of"),
    (["data.resolution=16", "autoencoder.loss.disc_num_layers=3"], "autoencoder.loss.disc_num_layers: 3 layers"),
])
def test_config_errors_name_the_field(overrides, message):
    from tests.test_pipeline_e2e import QUICKSTART
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_config_defaults_follow_the_family():
    from tests.test_pipeline_e2e import QUICKSTART
    cfg = load_config(QUICKSTART)
    ae = cfg.autoencoder
    assert (ae.family, ae.loss.family, ae.loss.kl_weight, ae.loss.perceptual_weight, ae.l2_weight) == \
        ("kl", "kl", 1e-6, 0.0, 4.0)
    assert ae.loss.disc_start > ae.max_steps            # the quickstart never turns the GAN on
    vq = load_config(QUICKSTART, ["autoencoder.family=vq", "autoencoder.model.z_channels=3"]).autoencoder
    assert (vq.loss.family, vq.quantizer.code_dim, vq.model.double_z) == ("vq", 3, False)
    assert load_config(QUICKSTART, ["autoencoder.family=vq", "autoencoder.model.double_z=true"]).autoencoder.model.double_z


def test_resume_check_names_changed_fields(tmp_path, shards):
    c = _loop_cfg(shards)
    fp, part = training_fingerprint(c)
    (tmp_path / "meta.json").write_text(json.dumps({"step": 2, "fingerprint": fp, "config": part}))
    assert check_resume(str(tmp_path), {**c, "max_steps": 99, "eval_every": 5})["step"] == 2
    with pytest.raises(ResumeMismatchError, match=r"loss.disc_start \(2 -> 3\)"):
        check_resume(str(tmp_path), {**c, "loss": {**c["loss"], "disc_start": 3}})
    with pytest.raises(ResumeMismatchError, match=r"autoencoder\.max_steps: 1 is below step 2"):
        check_resume(str(tmp_path), {**c, "max_steps": 1})


def test_cosine_schedule_fingerprints_max_steps(shards):
    """A constant rate continues exactly to more steps; a cosine decays over max_steps, so another
    max_steps is another training (a continued run would jump its rate back up)."""
    c = {**_loop_cfg(shards), "lr_schedule": "constant"}
    assert training_fingerprint(c)[0] == training_fingerprint({**c, "max_steps": c["max_steps"] * 2})[0]
    cos = {**c, "lr_schedule": "cosine"}
    fp, part = training_fingerprint(cos)
    assert part["max_steps"] == c["max_steps"]
    assert fp != training_fingerprint({**cos, "max_steps": c["max_steps"] * 2})[0]


@pytest.mark.parametrize("family", ["kl", "vq"])
def test_latent_encoder_writes_the_families_latent(tmp_path, shards, family):
    """The cache's actor: KL writes the posterior, VQ the pre-quantisation latent with std 0."""
    from models.autoencoders import AUTOENCODER_FAMILIES, build_autoencoder
    from models.text import TextEncoder, TextEncoderConfig, save_text_encoder
    from pipelines.cache_latents import LatentEncoder
    from pipelines.shards import image_of, image_to_tensor_array, iter_samples, decode_sample
    torch.manual_seed(0)
    cfg = dict(TINY_AE) if family == "kl" else {"autoencoder": {**TINY_AE, "double_z": False},
                                                 "quantizer": {"code_dim": 4, "codebook_size": 8}}
    ae = build_autoencoder(family, cfg).eval()
    AUTOENCODER_FAMILIES[family].save_pretrained(ae, tmp_path / "ae", extra={"scale_factor": 1.0})
    save_text_encoder(TextEncoder(TextEncoderConfig(layers=1, width=32, heads=2, context_length=8)).eval(),
                      tmp_path / "te")
    raw = [s for _, s in zip(range(3), iter_samples(shards["val"]))]
    batch = {"__key__": [s["__key__"] for s in raw], "png": [s["png"] for s in raw], "txt": [s["txt"] for s in raw]}
    out = LatentEncoder(str(tmp_path / "ae"), str(tmp_path / "te"), RES)(batch)
    x = torch.from_numpy(np.stack([image_to_tensor_array(image_of(decode_sample(s)), RES) for s in raw]))
    mean = np.stack([np.load(__import__("io").BytesIO(b)) for b in out["mean.npy"]])
    std = np.stack([np.load(__import__("io").BytesIO(b)) for b in out["std.npy"]])
    assert mean.shape == (3, 4, RES // 2, RES // 2)
    with torch.no_grad():
        if family == "kl":
            post = ae.encode(x)
            want_mean, want_std = post.mean.numpy(), post.std.numpy()
        else:
            want_mean, want_std = ae.encode(x).numpy(), np.zeros_like(mean)
    np.testing.assert_allclose(mean, want_mean, atol=1e-5)
    np.testing.assert_array_equal(std, want_std) if family == "vq" else np.testing.assert_allclose(std, want_std, atol=1e-5)


# ---------------------------------------------------------------- Ray Train workers

@pytest.mark.slow   # ~45-65 s on 2 loaded cores, mostly Ray Train start-up (a no-op fit: ~40 s)
def test_kl_worker_two_ranks_gan_metrics_in_mlflow(ray_local, tmp_path, shards):
    """KL, 2 DDP ranks, GAN active from step 2 (steps 3-4 train the discriminator), perceptual term,
    EMA export, per-channel latent norm, every metric logged to MLflow."""
    from models.autoencoders import load_autoencoder
    from pipelines.tracking import Tracker
    tracker = Tracker.embedded(tmp_path, None, None, "ae-stage")
    run_id = tracker.start_run("autoencoder")
    (tmp_path / "replicas").mkdir()
    c = _loop_cfg(shards, loss={"perceptual_weight": 0.1}, ema_decay=0.9, l2_weight=1.0, eval_rfd=True,
                  eval_every=2, latent_norm="channel", precision="bf16", tracking_uri=tracker.uri, run_id=run_id,
                  _replica_dir=str(tmp_path / "replicas"))
    result = _fit(tmp_path / "ray", "kl", c)
    m = result.metrics
    assert m["step"] == 4 and m["replica_max_diff"] == 0.0
    assert m["val/images"] == 8 and 5 < m["val/psnr"] < 60 and -1 < m["val/ssim"] <= 1 and m[RFD_METRIC] > 0
    state = _replicas_equal(tmp_path / "replicas", 2)
    assert bool(state["discriminator.main.3.initialized"])   # ActNorm was initialised (from rank 0)
    with result.checkpoint.as_directory() as d:
        ae, extra = load_autoencoder(os.path.join(d, MODEL_DIR))
        assert os.path.isfile(os.path.join(d, "reconstructions.png"))
        assert os.path.isfile(os.path.join(d, STATE_DIR, "model.pt"))
    assert extra["weights"] == "ema" and extra["family"] == "kl" and "scale_factor" not in extra
    norm = LatentNorm.from_extra(extra)
    assert norm.kind == "channel" and len(norm.scale) == 4
    assert extra["latent_std"] == pytest.approx(1.0 / m["scale_factor"])
    # The exported weights are the EMA, not the last step's.
    raw = torch.load(tmp_path / "replicas" / "rank0.pt", weights_only=True)
    w = "decoder.conv_out.weight"
    assert not torch.equal(ae.state_dict()[w], raw[f"autoencoder.{w}"])
    client = tracker.client
    hist = {k: [(x.step, x.value) for x in client.get_metric_history(run_id, k)]
            for k in ("train/disc_loss", "train/g_loss", "train/d_weight", "train/p_loss", "val/psnr", RFD_METRIC)}
    assert [s for s, _ in hist["train/disc_loss"]] == [3, 4]            # D steps from global step 2 on
    assert all(v > 0 for _, v in hist["train/disc_loss"])               # hinge loss once active
    assert [v for _, v in hist["train/g_loss"]][:2] == [0.0, 0.0]       # disc_factor 0 before disc_start
    assert all(v != 0 for _, v in hist["train/d_weight"][2:]) and all(v > 0 for _, v in hist["train/p_loss"])
    assert [s for s, _ in hist["val/psnr"]] == [2]                     # eval_every; the final set is the stage's
    assert len(hist[RFD_METRIC]) == 1


def test_vq_worker_codebook_buffers_identical_on_ranks(ray_local, tmp_path, shards):
    """VQ with an EMA codebook and dead-code restarts: DDP does not broadcast buffers here
    (broadcast_buffers=False), so equality comes from the quantiser's all_reduce alone."""
    (tmp_path / "replicas").mkdir()
    c = _loop_cfg(shards, family="vq", loss={"disc_start": 1},
                  quantizer={"codebook_size": 16, "ema": True, "dead_code_steps": 1}, checkpoint_every=2,
                  _replica_dir=str(tmp_path / "replicas"))
    result = _fit(tmp_path / "ray", "vq", c)
    m = result.metrics
    assert m["replica_max_diff"] == 0.0
    assert 1 <= m["val/perplexity"] <= 16 and 0 < m["val/codebook_usage"] <= 1
    state = _replicas_equal(tmp_path / "replicas", 2)
    # The buffers did move: the codebook is not its initialisation any more.
    from models.autoencoders import build_autoencoder
    torch.manual_seed(c["seed"])
    init = build_autoencoder("vq", {"autoencoder": c["model"], "quantizer": c["quantizer"]}).state_dict()
    for k in ("quantize.codebook", "quantize.cluster_size", "quantize.embed_sum"):
        assert not torch.equal(state[f"autoencoder.{k}"], init[k]), k
    with result.checkpoint.as_directory() as d:
        norm = load_latent_norm(os.path.join(d, MODEL_DIR))
    assert norm.kind == "tensor" and norm.scale_factor == pytest.approx(m["scale_factor"])


def _final_state(result) -> dict:
    with result.checkpoint.as_directory() as d:
        s = torch.load(os.path.join(d, STATE_DIR, "model.pt"), weights_only=True)
        from models.checkpoint import load_state
        s["export"] = load_state(os.path.join(d, MODEL_DIR))[1]
        return s


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(ray_local, tmp_path, shards):
    """KL with posterior sampling, the GAN from step 2, model EMA: stopped after step 3 and resumed
    (explicit resume_from), or failed after step 3 and restarted by Ray Train (FailureConfig), both
    end with the same weights, optimizer states, discriminator and EMA as a run of 6 steps."""
    kw = {"max_steps": 6, "ema_decay": 0.8, "eval_images": 4, "lr_schedule": "cosine", "warmup_steps": 2}
    full = _final_state(_fit(tmp_path / "ray", "full", _loop_cfg(shards, **kw)))
    first = _fit(tmp_path / "ray", "part1", _loop_cfg(shards, stop_after_steps=3, **kw))
    assert first.metrics["step"] == 3
    with first.checkpoint.as_directory() as d:
        assert not os.path.isdir(os.path.join(d, MODEL_DIR))
        resumed = _fit(tmp_path / "ray", "part2", _loop_cfg(shards, resume_from=d, **kw))
    _assert_same(_final_state(resumed), full)
    restarted = _fit(tmp_path / "ray", "failed", _loop_cfg(shards, checkpoint_every=3, _fail_at_step=3, **kw),
                     max_failures=1)
    _assert_same(_final_state(restarted), full)


# ---------------------------------------------------------------- starting from saved weights

def _diffusers_kl_dir(path, **model):
    """TINY_AE's architecture (plus `model` changes) saved by diffusers' AutoencoderKL.save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    from models.interop.diffusers_autoencoder import diffusers_autoencoder_kl_kwargs
    torch.manual_seed(3)
    theirs = diffusers.AutoencoderKL(**diffusers_autoencoder_kl_kwargs(
        AutoencoderConfig.from_dict({**TINY_AE, "norm_num_groups": 8, **model}), scale_factor=0.5))
    theirs.save_pretrained(path)
    return path


def test_init_weights_of_another_architecture_fail_before_any_worker(tmp_path, shards):
    """The stage checks init_weights on the driver: the error names the config path and every
    differing field, and nothing (no MLflow run, no Ray job) has started."""
    from pipelines.train_autoencoder import train_autoencoder
    src = _diffusers_kl_dir(tmp_path / "vae", ch=16)

    class NoTrainingContext:
        ray_storage = tmp_path / "ray"

        def stage_dir(self, name):
            return tmp_path / name

        def stage_run(self, *a, **k):
            raise AssertionError("the stage started a run before checking init_weights")

    c = _loop_cfg(shards)
    cfg = AutoencoderStageConfig(**{**{k: v for k, v in c.items() if k in AutoencoderStageConfig.__dataclass_fields__},
                                    "model": AutoencoderConfig.from_dict({**TINY_AE, "norm_num_groups": 8}),
                                    "loss": AutoencoderLossConfig.from_dict(c["loss"]),
                                    "quantizer": QuantizerConfig.from_dict(c["quantizer"]),
                                    "init_weights": str(src)})

    class Data:
        dataset_hash, run_id, train_urls, val_urls = "d", "r", shards["train"], shards["val"]

    with pytest.raises(ConfigError, match=r"^autoencoder\.init_weights: .*\(diffusers AutoencoderKL\) is another "
                                          r"architecture: model\.ch \(weights 16, config 8\)$"):
        train_autoencoder(cfg, Data(), NoTrainingContext())
    with pytest.raises(ConfigError, match=r"^autoencoder\.init_weights: .*missing: no config\.json"):
        train_autoencoder(dataclasses_replace(cfg, init_weights=str(tmp_path / "missing")), Data(),
                          NoTrainingContext())
    with pytest.raises(ConfigError, match="^init_weights: expected a directory path or null"):
        AutoencoderStageConfig(init_weights="")


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_init_weights_are_part_of_the_stage_key(tmp_path):
    from pipelines.run import _external_inputs
    from tests.test_pipeline_e2e import QUICKSTART
    assert _external_inputs(load_config(QUICKSTART), "autoencoder") == {}
    src = _diffusers_kl_dir(tmp_path / "vae")
    cfg = load_config(QUICKSTART, [f"autoencoder.init_weights={src}"])
    first = _external_inputs(cfg, "autoencoder")
    assert [os.path.basename(f["path"]) for f in first["init_weights"]] == \
        ["config.json", "diffusion_pytorch_model.safetensors"]
    weights = src / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")     # other weights at the same path: another key
    assert _external_inputs(cfg, "autoencoder") != first


def test_worker_starts_from_diffusers_weights(ray_local, tmp_path, shards):
    """One step at a negligible learning rate from a diffusers directory: the exported model is the
    diffusers model's weights (Adam moves each by ~lr), not the seeded random init."""
    from models.autoencoders import build_autoencoder, load_autoencoder
    from models.interop.diffusers_autoencoder import read_diffusers_autoencoder
    src = _diffusers_kl_dir(tmp_path / "vae")
    _, _, want, _ = read_diffusers_autoencoder(src)
    c = _loop_cfg(shards, max_steps=1, lr=1e-12, num_workers=1, eval_images=4, loss={"disc_start": 10},
                  init_weights=str(src))
    c["model"] = {**c["model"], "norm_num_groups": 8}
    result = _fit(tmp_path / "ray", "init", c)
    with result.checkpoint.as_directory() as d:
        ae, _ = load_autoencoder(os.path.join(d, MODEL_DIR))
    got = ae.state_dict()
    torch.manual_seed(c["seed"])
    random_init = build_autoencoder("kl", c["model"]).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-9, rtol=0, msg=k)
    assert not torch.equal(got["encoder.conv_in.weight"], random_init["encoder.conv_in.weight"])


def test_evaluation_computes_the_real_features_once(shards, monkeypatch):
    """A second evaluation of the same validation images reuses their feature sums (only the
    reconstructions are new) and gives the same metrics as computing everything again."""
    import pipelines.train_autoencoder as tae
    from models.autoencoders import build_autoencoder
    c = _loop_cfg(shards, eval_rfd=True)
    torch.manual_seed(0)
    net = build_autoencoder("kl", TINY_AE)
    feats = tae._rfd_features("cpu")
    calls = []

    class Counting:   # the features, counting the images they see
        dim = feats.dim

        def __call__(self, x):
            calls.append(len(x))
            return feats(x)
    monkeypatch.setattr(tae, "_rfd_features", lambda device: Counting())
    monkeypatch.setattr(tae, "_REAL_STATS", {})
    first = tae._evaluate(net, c, "cpu", 0, 1)
    n_first = sum(calls)
    second = tae._evaluate(net, c, "cpu", 0, 1)
    assert n_first == 16 and sum(calls) - n_first == 8      # 8 real + 8 fake, then 8 fake only
    assert second == first and RFD_METRIC in first
    monkeypatch.setattr(tae, "_REAL_STATS", {})
    assert tae._evaluate(net, c, "cpu", 0, 1) == first       # computed afresh: the same numbers
