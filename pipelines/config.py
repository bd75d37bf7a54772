"""The pipeline configuration: one YAML, typed sections, validated before any work starts.

A config is a tree of dataclasses. The model sections embed the models' own config classes
(`AutoencoderConfig`, `UNetConfig`, ...) so what the YAML says is exactly what the constructor gets
and what is saved beside the weights. `load_config` rejects unknown keys and wrong types with the
field's full path (``diffusion.unet.channels: expected int, got str 'wide'``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.prebuild import DEFAULT_DIR as _TORCH_EXTENSIONS_DIR
from models.autoencoder import AutoencoderConfig
from models.clip import VisionTowerConfig
from models.denoiser import ObjectiveConfig
from models.losses import AutoencoderLossConfig
from models.quantize import QuantizerConfig
from models.schedules import ScheduleConfig
from models.text import TextEncoderConfig
from models.unet import UNetConfig

__all__ = [
    "ConfigError", "PipelineConfig", "DataConfig", "AutoencoderStageConfig", "CacheConfig", "ClipStageConfig",
    "DiffusionConfig", "SampleConfig", "TrackingConfig", "ClusterConfig",
    "load_config", "from_dict", "to_dict", "apply_overrides", "config_hash", "loop_fingerprint",
]


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message starts with its path."""


@dataclass
class DataConfig:
    source: Literal["shapes", "emoji", "shards"] = "shapes"
    resolution: int = 32            # images are square, resolution x resolution
    num_train: int = 4096           # shapes: images generated; emoji/shards: upper bound (0 = all)
    num_val: int = 256              # held out for validation (emoji: taken from the seeded permutation)
    shard_size: int = 512           # samples per tar shard
    seed: int = 0                   # generation and split seed: same seed, same bytes
    max_objects: int = 2            # shapes: objects per image, 1..max_objects
    font_path: str | None = None    # emoji: Noto Color Emoji .ttf; None = the Debian path
    train_urls: str | None = None   # shards: a directory, brace pattern or fsspec URL of train shards
    val_urls: str | None = None     # shards: the same for validation shards
    # shapes: "color shape" pairs (e.g. "red triangle") that never appear in the training split, so
    # text alignment can be measured on compositions the model has not seen (held-out prompts).
    holdout: tuple[str, ...] = ()

    def __post_init__(self):
        if self.holdout:
            if self.source != "shapes":
                raise ConfigError(f"holdout: only for source 'shapes', got source {self.source!r}")
            from pipelines.datasets.shapes import parse_pairs
            try:
                parse_pairs(self.holdout)
            except ValueError as e:
                raise ConfigError(f"holdout: {e}") from None
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution: expected a multiple of 8 >= 8, got {self.resolution}")
        for name in ("num_train", "num_val"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: expected >= 1, got {self.shard_size}")
        if self.source == "shards" and not self.train_urls:
            raise ConfigError("train_urls: required when source is 'shards'")


@dataclass
class AutoencoderStageConfig:
    """The first stage (LDM's autoencoder): a KL or VQ autoencoder, its loss (L1/L2 + perceptual +
    KL or codebook + PatchGAN from `loss.disc_start`), and the latent normalisation measured after
    training. `loss` is models.losses.AutoencoderLossConfig: its defaults are LDM's (perceptual_weight
    1.0, disc_start 50001); measured on the quickstart AE (1 CPU thread, batch 16 at 32 px, bf16) a
    step costs 135 ms plain, 330 ms with the perceptual term, 370 ms with the discriminator active,
    so the quickstart sets perceptual_weight 0 and stays below disc_start."""
    family: Literal["kl", "vq"] = "kl"  # "vq": `quantizer` bottleneck (models/autoencoder_vq.py)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # vq: double_z defaults to False
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # vq only; code_dim = model.z_channels
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # loss.family = family
    l2_weight: float = 0.0          # extra MSE term on top of loss.rec_loss (not in LDM; speeds up short runs)
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"  # LDM: constant; cosine decays to 0 by max_steps
    warmup_steps: int = 0           # linear LR warm-up (both optimizers)
    disc_lr: float | None = None    # discriminator's Adam; None = lr (LDM uses one rate for both)
    adam_betas: tuple[float, ...] = (0.5, 0.9)  # both optimizers; LDM's; (0.9, 0.999) faster without a GAN
    grad_clip: float = 1.0          # max grad norm, autoencoder and discriminator separately; 0 = off
    ema_decay: float = 0.0          # EMA of the autoencoder's weights, exported as the model; 0 = off
    batch_size: int = 32            # per worker
    max_steps: int = 1000           # optimizer steps (every rank takes the same number: no DDP hang)
    # Or a budget in CPU seconds of each worker's training steps (ends at the first step past it,
    # on every rank at once; a cosine LR decays over the steps it will reach). 0 = steps only.
    max_cpu_seconds: float = 0.0
    num_workers: int = 2            # Ray Train workers (DDP ranks)
    log_every: int = 25
    seed: int = 0
    scale_batches: int = 8          # batches of train latents (per rank) for the latent normalisation
    latent_norm: Literal["tensor", "channel"] = "tensor"  # 1/std (LDM scale_by_std) or per-channel mean/std
    eval_every: int = 0             # steps between validation metrics; 0 = only at the end
    eval_images: int = 512          # validation images for the metrics (over all ranks); 0 = all
    eval_rfd: bool = True           # reconstruction Frechet distance on EfficientNet-Lite0 features
    checkpoint_every: int = 0       # steps between resumable checkpoints; 0 = only the last
    max_failures: int = 2           # Ray Train restarts from the last checkpoint after a worker failure
    stop_after_steps: int = 0       # test/ops hook: end after the checkpoint at this step (0 = never)
    # bf16 = autocast (fp32 weights): ~2.5x on AMX CPUs, ~16x SLOWER where bf16 is emulated (AVX2);
    # auto = bf16 where the worker's device has it natively (models/precision.py), else fp32.
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    preload_max_gb: float = 0.5     # a rank's image shards up to this size are decoded once into RAM
    # Start from saved weights instead of a random init: a directory of ours (an autoencoder
    # stage's model/) or diffusers' (AutoencoderKL / VQModel.save_pretrained). Its architecture
    # must be `model` (and `quantizer`); checked before training. Read by every worker: a path
    # they all see. A resumed run continues from its checkpoint instead.
    init_weights: str | None = None

    def __post_init__(self):
        if self.init_weights is not None and (not isinstance(self.init_weights, str) or not self.init_weights):
            raise ConfigError(f"init_weights: expected a directory path or null, got {self.init_weights!r}")
        _positive(self, "lr", "batch_size", "max_steps", "num_workers", "log_every", "scale_batches")
        for name in ("l2_weight", "grad_clip", "eval_every", "eval_images", "checkpoint_every",
                     "max_failures", "stop_after_steps", "warmup_steps", "max_cpu_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ConfigError(f"disc_lr: expected > 0 (or null = lr), got {self.disc_lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: expected in [0, 1), got {self.ema_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas: expected two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.loss.family != self.family:
            raise ConfigError(f"loss.family: expected family ({self.family!r}), got {self.loss.family!r}")
        if self.family == "vq" and self.quantizer.code_dim != self.model.z_channels:
            raise ConfigError(f"quantizer.code_dim: expected model.z_channels ({self.model.z_channels}), "
                              f"got {self.quantizer.code_dim}")
        if self.loss.disc_in_channels != self.model.in_channels:
            raise ConfigError(f"loss.disc_in_channels: expected model.in_channels ({self.model.in_channels}), "
                              f"got {self.loss.disc_in_channels}")
        if self.model.in_channels != 3 and (self.loss.perceptual_weight > 0 or self.eval_rfd):
            raise ConfigError(f"model.in_channels: the perceptual loss and eval_rfd need RGB (3), got "
                              f"{self.model.in_channels}; set loss.perceptual_weight 0 and eval_rfd false")
        # PatchGAN output side: k4 p1 convs, stride 2 for the first n_layers, then two stride-1 ones.
        side = self.model.resolution
        for _ in range(self.loss.disc_num_layers):
            side = (side - 2) // 2 + 1
        if side - 2 < 1:
            raise ConfigError(f"loss.disc_num_layers: {self.loss.disc_num_layers} layers leave no patch of a "
                              f"{self.model.resolution}px image; use fewer")


@dataclass
class CacheConfig:
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    batch_size: int = 64            # images per encode call in one actor
    concurrency: int = 2            # encoder actors in the Ray Data pool
    root: str | None = None         # where latent caches live (keyed subdirs); None = <output_dir>/latents

    def __post_init__(self):
        _positive(self, "batch_size", "concurrency")


@dataclass
class ClipStageConfig:
    """Contrastive pretraining of the text encoder (open_clip CLIP + ClipLoss) on the dataset's
    image-caption pairs. The text tower trained is `cache.text_encoder` (random init from its seed);
    the cache then encodes captions with the trained tower instead of a random one."""
    enabled: bool = False
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)  # image_size follows data.resolution
    lr: float = 5e-4
    weight_decay: float = 0.1
    batch_size: int = 128           # per worker; the contrastive batch is num_workers * batch_size
    max_steps: int = 500
    warmup_steps: int = 50          # linear warm-up, then cosine decay to 0
    num_workers: int = 2            # Ray Train workers (DDP ranks; features gathered across ranks)
    log_every: int = 25
    seed: int = 0
    precision: Literal["fp32", "bf16", "auto"] = "auto"   # autocast; auto: bf16 where native (models/precision.py)
    preload_max_gb: float = 0.5

    def __post_init__(self):
        _positive(self, "lr", "batch_size", "max_steps", "num_workers", "log_every")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay/warmup_steps: expected >= 0")


@dataclass
class DiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # eps/v/x0 or flow; min-SNR; offset noise
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 64            # per worker
    max_steps: int = 2000
    # Or a budget in CPU seconds of each worker's training steps (ends at the first step past it,
    # on every rank at once), for equal-budget comparisons. 0 = steps only.
    max_cpu_seconds: float = 0.0
    warmup_steps: int = 100         # linear LR warm-up
    # constant after the warm-up (LDM, SD); cosine decays to 0 by max_steps (or by the steps a
    # max_cpu_seconds budget will reach, as the autoencoder's does)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0          # 0 disables clipping
    cond_drop_prob: float = 0.1     # classifier-free guidance: P(caption -> empty caption)
    ema_decay: float = 0.999        # 0 disables EMA
    zero_stage: int = 2             # DeepSpeed ZeRO stage 0-3
    # bf16 autocast in the DeepSpeed engine (fp32 weights, loss in fp32); auto: bf16 where the
    # worker's device has it natively (quickstart diffusion 370 -> 303 s on avx512_bf16)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    # torch.compile the U-Net in each worker (forward and backward): the quickstart U-Net's fp32
    # step 1.09x faster on 2 CPU cores for ~80 s of compiling with a cold inductor cache (~5 s
    # warm), repaid after ~8,000 steps (benchmarks/training_compile.py): for long runs. ZeRO 0-2.
    compile: bool = False
    num_workers: int = 2            # Ray Train workers (DeepSpeed ranks)
    log_every: int = 50
    seed: int = 0
    preload_max_gb: float = 2.0     # a rank's latent shards up to this size are decoded once into RAM
    grad_accum: int = 1             # micro-batches per optimizer step; max_steps counts optimizer steps
    checkpoint_every: int = 500     # optimizer steps between resumable checkpoints (0 = only the last)
    max_failures: int = 2           # Ray Train restarts from the last checkpoint after a worker failure
    stop_after_steps: int = 0       # test/ops hook: end after the checkpoint at this step (0 = never)

    def __post_init__(self):
        _positive(self, "lr", "batch_size", "max_steps", "num_workers", "log_every", "grad_accum")
        for name in ("checkpoint_every", "max_failures", "stop_after_steps", "max_cpu_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.compile and self.zero_stage == 3:
            # ZeRO-3 gathers each layer's parameters in forward hooks, which a compiled graph skips.
            raise ConfigError("compile: supported with zero_stage 0, 1 or 2, got zero_stage 3")
        if not 0 <= self.cond_drop_prob < 1:
            raise ConfigError(f"cond_drop_prob: expected in [0, 1), got {self.cond_drop_prob}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: expected in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps/grad_clip: expected >= 0")


@dataclass
class SampleConfig:
    prompts: str | None = None      # .txt (one prompt a line) or .jsonl ({"prompt": ..., "seed"?: ...})
    num_per_prompt: int = 1
    sampler: str = "ddim"           # a key of models.samplers.SAMPLERS (ddim, ddpm, dpmpp_2m, euler, flow_euler)
    spacing: str = "trailing"       # timestep spacing: trailing, leading or linspace (diffusers' options)
    steps: int = 50                 # sampler steps (model evaluations; 2x with guidance, in one batch)
    guidance_scale: float = 4.0     # classifier-free guidance; 1 = no guidance, 0 = unconditional
    eta: float = 0.0                # DDIM only: 0 deterministic, 1 ~ ancestral
    seed: int = 0                   # per-image seed = seed + index, unless the jsonl row gives one
    batch_size: int = 16
    concurrency: int = 1            # sampler actors in the Ray Data pool
    use_ema: bool = True
    precision: str = "fp32"         # fp32 | bf16: the U-Net as a bfloat16 copy (see BENCHMARKS.md)
    compile: bool = False           # torch.compile the U-Net in each actor (pays off for long jobs)

    def __post_init__(self):
        _positive(self, "num_per_prompt", "steps", "batch_size", "concurrency")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: expected fp32 or bf16, got {self.precision!r}")
        from models.samplers import SAMPLERS, SPACINGS
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"spacing: expected one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if self.eta and self.sampler != "ddim":
            raise ConfigError(f"eta: only the ddim sampler takes eta, got eta={self.eta} with {self.sampler!r}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: expected >= 0, got {self.guidance_scale}")


@dataclass
class BaselineStageConfig:
    """The `train_baseline` stage: one family of models/baselines (a flat registry) under Ray Train.
    `model` holds the family's own Config fields; in_channels and resolution come from the data."""
    family: str = "vae"             # a key of models.baselines.BASELINES
    model: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32            # per worker
    max_steps: int = 1000           # optimizer steps (closed-form families: ignored)
    # Training budget in CPU seconds of each worker process (all its threads), for equal-budget
    # comparisons: unlike wall time it does not shrink when other work shares the machine. 0 = steps only.
    max_cpu_seconds: float = 0.0
    num_workers: int = 2            # Ray Train workers (gradients averaged over ranks)
    log_every: int = 25
    seed: int = 0
    checkpoint_every: int = 0       # steps between resumable checkpoints; 0 = only the last
    max_failures: int = 2           # Ray Train restarts from the last checkpoint after a worker failure
    fit_batches: int = 0            # closed-form families (ppca): batches per rank; 0 = one pass over the data
    preload_max_gb: float = 0.5     # a rank's image shards up to this size are decoded once into RAM

    def __post_init__(self):
        _positive(self, "batch_size", "max_steps", "num_workers", "log_every")
        for name in ("max_cpu_seconds", "checkpoint_every", "max_failures", "fit_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        from models.baselines import BASELINES
        if self.family not in BASELINES:
            raise ConfigError(f"family: unknown baseline {self.family!r} (expected one of "
                              f"{', '.join(sorted(BASELINES))})")
        for name in ("in_channels", "resolution"):
            if name in self.model:
                raise ConfigError(f"model.{name}: set by the data (data.resolution, RGB), not here")


@dataclass
class EvaluateConfig:
    """The `evaluate` stage: the same scores for any model (a baseline or the latent diffusion
    pipeline), on the held-out split."""
    num_samples: int = 256          # images generated (through `ldmflow generate`) for FD and precision/recall
    batch_size: int = 32            # generation batch
    concurrency: int = 1            # generation actors
    features: Literal["efficientnet_lite0", "inception"] = "efficientnet_lite0"
    inception_weights: str | None = None  # a pt_inception-2015-12-05 state dict; required for features=inception
    knn_k: int = 3                  # k of k-NN precision/recall (Kynkaanniemi et al. 2019)
    bpd_images: int = 256           # held-out images for bits/dim (likelihood models); 0 = all
    real_images: int = 0            # held-out images as the reference set; 0 = all
    seed: int = 0

    def __post_init__(self):
        _positive(self, "num_samples", "batch_size", "concurrency", "knn_k")
        for name in ("bpd_images", "real_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.features == "inception" and not self.inception_weights:
            raise ConfigError("inception_weights: features=inception needs the path of InceptionV3 FID weights "
                              "(they cannot be downloaded here)")


@dataclass
class CompareConfig:
    """`ldmflow compare`: every family and the latent diffusion model on the same data, at the same
    training CPU budget per worker, scored by the evaluate stage."""
    families: tuple[str, ...] = ("ppca", "vae", "vqvae", "pixelcnn", "imagegpt", "dcgan", "stylegan",
                                 "glow", "ddpm")
    models: dict[str, dict[str, Any]] = field(default_factory=dict)   # per-family model fields
    batch_size: dict[str, int] = field(default_factory=dict)         # per-family batch (default baseline.batch_size)
    budget_cpu_seconds: float = 600.0   # training CPU seconds per worker, each model
    include_ldm: bool = True        # also run the pipeline's own stages and evaluate its samples
    # The LDM row on the same budget: its two training stages split budget_cpu_seconds, the
    # autoencoder this share and the U-Net the rest (their max_steps are then no limit). False:
    # the LDM stages run their own step counts and the row reports the CPU seconds they took.
    ldm_equal_budget: bool = True
    ldm_autoencoder_share: float = 0.3

    def __post_init__(self):
        _positive(self, "budget_cpu_seconds")
        if not 0 < self.ldm_autoencoder_share < 1:
            raise ConfigError(f"ldm_autoencoder_share: expected in (0, 1), got {self.ldm_autoencoder_share}")
        from models.baselines import BASELINES
        for name in (*self.families, *self.models, *self.batch_size):
            if name not in BASELINES:
                raise ConfigError(f"families: unknown baseline {name!r} (expected one of "
                                  f"{', '.join(sorted(BASELINES))})")
        if len(set(self.families)) != len(self.families):
            raise ConfigError(f"families: listed twice: {sorted({f for f in self.families if self.families.count(f) > 1})}")


@dataclass
class TrackingConfig:
    uri: str | None = None               # None = sqlite:///<output_dir>/mlflow.db (embedded)
    artifact_location: str | None = None  # None = <output_dir>/mlartifacts
    experiment: str = "ldmflow"
    register_models: bool = True         # put autoencoder and U-Net into the Model Registry
    model_prefix: str = "ldmflow"        # registered names: <prefix>-autoencoder, <prefix>-unet


@dataclass
class ClusterConfig:
    address: str | None = None      # None = start a local Ray for the run; "auto" or ray://... joins one
    num_cpus: int | None = None     # local Ray only; None = all cores
    use_gpu: bool = False
    # DeepSpeed JIT ops cache (scripts/setup.sh prebuilds into it); the default holds one subdirectory
    # per Python environment (cluster.prebuild.resolve_dir), an explicit path is used as given.
    torch_extensions_dir: str = _TORCH_EXTENSIONS_DIR
    # Where Ray Train persists checkpoints: a URL (s3://bucket/prefix) or an absolute path every node
    # sees; None = <output_dir>/ray_results. Each output dir's stages get their own prefix under it
    # (pipelines/stage.py StageContext.ray_storage).
    storage_uri: str | None = None

    def __post_init__(self):
        if self.storage_uri is not None:
            uri = self.storage_uri
            if not uri.strip() or not ("://" in uri or uri.startswith("/")):
                raise ConfigError(f"storage_uri: expected a URL (s3://bucket/prefix) or an absolute path, "
                                  f"got {uri!r}")


@dataclass
class PipelineConfig:
    name: str = "quickstart"
    output_dir: str = "runs/quickstart"   # relative to the working directory
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderStageConfig = field(default_factory=AutoencoderStageConfig)
    clip: ClipStageConfig = field(default_factory=ClipStageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    baseline: BaselineStageConfig = field(default_factory=BaselineStageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        # Cross-section checks: each names the field that has to change.
        ae = self.autoencoder.model
        if ae.resolution != self.data.resolution:
            raise ConfigError(f"autoencoder.model.resolution: expected data.resolution "
                              f"({self.data.resolution}), got {ae.resolution}")
        if self.diffusion.unet.in_channels != ae.z_channels:
            raise ConfigError(f"diffusion.unet.in_channels: expected autoencoder.model.z_channels "
                              f"({ae.z_channels}), got {self.diffusion.unet.in_channels}")
        if self.diffusion.unet.out_channels != ae.z_channels:
            raise ConfigError(f"diffusion.unet.out_channels: expected autoencoder.model.z_channels "
                              f"({ae.z_channels}), got {self.diffusion.unet.out_channels}")
        te = self.cache.text_encoder
        te_width = te.width or _text_width(te.model)
        if self.diffusion.unet.context_dim != te_width:
            raise ConfigError(f"diffusion.unet.context_dim: expected the text encoder's width ({te_width}, "
                              f"cache.text_encoder), got {self.diffusion.unet.context_dim}")
        try:
            self.diffusion.objective.check_schedule(self.diffusion.schedule)
        except ValueError as e:
            raise ConfigError(f"diffusion.objective.{e}") from None
        from models.samplers import SAMPLER_OBJECTIVES
        if SAMPLER_OBJECTIVES[self.sample.sampler] != self.diffusion.objective.kind:
            raise ConfigError(f"sample.sampler: {self.sample.sampler!r} samples a "
                              f"{SAMPLER_OBJECTIVES[self.sample.sampler]!r} objective, but diffusion.objective.kind "
                              f"is {self.diffusion.objective.kind!r}")
        if self.sample.steps > self.diffusion.schedule.num_timesteps:
            raise ConfigError(f"sample.steps: at most diffusion.schedule.num_timesteps "
                              f"({self.diffusion.schedule.num_timesteps}), got {self.sample.steps}")
        self._check_baseline_models()
        if self.clip.enabled:
            if self.cache.text_encoder.pretrained is not None:
                raise ConfigError("clip.enabled: trains the text encoder from scratch, but "
                                  "cache.text_encoder.pretrained is set; disable one of them")
            if self.clip.vision.image_size != self.data.resolution:
                raise ConfigError(f"clip.vision.image_size: expected data.resolution "
                                  f"({self.data.resolution}), got {self.clip.vision.image_size}")


    def baseline_model(self, family: str | None = None) -> dict[str, Any]:
        """The model config dict of a baseline family: its compare.models entry (or baseline.model
        for baseline.family), with the data's channels and resolution."""
        family = family or self.baseline.family
        fields = self.compare.models.get(family, self.baseline.model if family == self.baseline.family else {})
        return {**fields, "in_channels": 3, "resolution": self.data.resolution}

    def _check_baseline_models(self) -> None:
        from models.baselines import baseline_class
        data = {"in_channels": 3, "resolution": self.data.resolution}
        checks = [("baseline.model", self.baseline.family, self.baseline.model),
                  *((f"compare.models.{f}", f, m) for f, m in self.compare.models.items())]
        for path, family, fields in checks:
            try:
                cls = baseline_class(family)
            except ImportError:
                continue   # a family whose module is missing fails when it is trained, naming itself
            try:
                cls.Config.from_dict({**fields, **data})
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{path}.{e}") from None


def _text_width(model: str) -> int:
    from models.text import _model_cfg
    return int(_model_cfg(model)["text_cfg"].get("width", 512))


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{name}: expected > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass, with type checks that name the path

_SCI = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return str(tp)


def _convert(value, tp, path: str):
    """Check `value` against the annotation `tp` and return it in the dataclass's own form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.match(value.strip()):
            return float(value)   # PyYAML (YAML 1.1) reads `1e-4` as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")  # a bug in a config class, not the user's


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Raised by a cross-field check of this class: its message starts with the field name.
        raise ConfigError(prefix + str(e)) from None
    except (ValueError, TypeError) as e:
        # The models' config classes validate in __post_init__ and name the field first.
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(obj) -> dict:
    """A dataclass tree as JSON-ready primitives (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def config_hash(obj) -> str:
    """Stable hash of a config (or any JSON-ready value): the same settings give the same hash."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def loop_fingerprint(c: dict, not_fingerprinted: frozenset[str] | set[str]) -> tuple[str, dict]:
    """(hash, fingerprinted part) of a training worker's loop config `c`: what must match for an exact
    resume. Every key counts but `not_fingerprinted` (what a run may change when it continues) and
    test hooks ("_..."). max_steps, where listed there, counts again when `lr_schedule` decays over
    it: continuing a cosine run would jump its rate back up, which no fresh run of that length trains."""
    skip = set(not_fingerprinted)
    if c.get("lr_schedule", "constant") != "constant":
        skip.discard("max_steps")
    part = {k: v for k, v in c.items() if k not in skip and not k.startswith("_")}
    return config_hash(part), part


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values parse as YAML (`3`, `1e-4`, `[1, 2]`, `null`)."""
    data = json.loads(json.dumps(data))  # deep copy; the YAML is plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse override value {raw!r}: {e}") from None
    return data


def _fill_defaults(data: dict) -> dict:
    """The autoencoder's resolution follows the data unless the YAML sets it; the U-Net's latent
    channels follow the autoencoder and its context width the text encoder's `width` override.
    Only fills what is absent, so explicit mismatches still fail."""
    data = dict(data)
    res = (data.get("data") or {}).get("resolution", DataConfig.resolution)
    ae = dict(data.get("autoencoder") or {})
    if "kl_weight" in ae:
        raise ConfigError("autoencoder.kl_weight: moved to autoencoder.loss.kl_weight")
    ae_model = dict(ae.get("model") or {})
    ae_model.setdefault("resolution", res)
    # The loss follows the stage's family; a VQ bottleneck is code_dim = z_channels wide and its
    # encoder emits z_channels (LDM's VQ configs: double_z false), unless the YAML says otherwise.
    family = ae.get("family", AutoencoderStageConfig.family)
    ae_loss = dict(ae.get("loss") or {})
    ae_loss.setdefault("family", family)
    ae["loss"] = ae_loss
    if family == "vq":
        ae_model.setdefault("double_z", False)
        ae_q = dict(ae.get("quantizer") or {})
        ae_q.setdefault("code_dim", ae_model.get("z_channels", AutoencoderConfig.z_channels))
        ae["quantizer"] = ae_q
    ae["model"] = ae_model
    data["autoencoder"] = ae
    z = ae_model.get("z_channels", AutoencoderConfig.z_channels)
    diff = dict(data.get("diffusion") or {})
    unet = dict(diff.get("unet") or {})
    unet.setdefault("in_channels", z)
    unet.setdefault("out_channels", z)
    width = ((data.get("cache") or {}).get("text_encoder") or {}).get("width")
    if width is not None:
        unet.setdefault("context_dim", width)
    diff["unet"] = unet
    data["diffusion"] = diff
    clip = dict(data.get("clip") or {})
    vision = dict(clip.get("vision") or {})
    vision.setdefault("image_size", res)
    clip["vision"] = vision
    data["clip"] = clip
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> PipelineConfig:
    """Load a pipeline YAML (or a dict), apply overrides, validate everything, return the typed tree.

    Relative input paths (`sample.prompts`, `data.train_urls`, `data.val_urls`) are resolved against
    the YAML's directory, so a config travels with the files it names.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    for section, value in data.items():
        if value is None:
            raise ConfigError(f"{section}: empty section (remove it or give it keys)")
    cfg = from_dict(PipelineConfig, _fill_defaults(data))
    if path is not None:
        base = path.resolve().parent
        if cfg.sample.prompts:
            cfg.sample.prompts = _resolve(cfg.sample.prompts, base)
        if cfg.data.train_urls:
            cfg.data.train_urls = _resolve(cfg.data.train_urls, base)
        if cfg.data.val_urls:
            cfg.data.val_urls = _resolve(cfg.data.val_urls, base)
    return cfg


def _resolve(p: str, base: Path) -> str:
    if "://" in p or p.startswith("/") or p.startswith("~"):
        return p
    return str(base / p)
