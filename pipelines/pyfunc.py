"""The trained pipeline as one model: a bundle directory, a sampler over it, and an MLflow pyfunc.

A *bundle* is everything needed to turn prompts into images, in one directory:

    diffusion/       unet/ (+ unet_ema/) weights + config.json, schedule.json, objective.json
    autoencoder/     model.safetensors + config.json (KL or VQ)
    text_encoder/    the exact text tower that encoded the training captions
    null_text.npz    the empty caption's states and mask (classifier-free guidance)
    bundle.json      scale_factor, default sampler settings, lineage (versions, hashes, cache key)

`BundleSampler` loads a bundle once and samples batches. `LdmPipelineModel` is the same thing as an
`mlflow.pyfunc.PythonModel` (the bundle is its one artifact), and `log_pipeline_model` logs and
registers it, so that

    mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["a red circle", ...])

returns a DataFrame with one row per prompt: `prompt`, `id`, `seed`, `image` (PNG bytes, RGB).
Input: a list of prompts, or a DataFrame with a `prompt` column and optional `id` / `seed` columns.
A row's seed is its `seed` if given, else `derive_seed(id, settings.seed)` with id the row's `id`
(else its 0-based position as a string): the same rule as `ldmflow generate`, so a generated image
can be remade through the pyfunc from its manifest row.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:   # mlflow is a dependency of pipelines/, but the bundle sampler itself does not need it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

__all__ = ["SamplerSettings", "ModelBundle", "BundleSampler", "LdmPipelineModel", "derive_seed",
           "bundle_from_pipeline", "write_bundle", "log_pipeline_model", "BUNDLE_FILE",
           "PIPELINE_MODEL_TAG"]

BUNDLE_FILE = "bundle.json"
ARTIFACT_NAME = "bundle"            # the pyfunc's one artifact (context.artifacts["bundle"])
MODEL_ARTIFACT_PATH = "pipeline_model"  # where log_pipeline_model puts the pyfunc in its run
# Set on a model version whose U-Net belongs to a logged pipeline model: models:/NAME-unet/V then
# resolves to that pipeline (the bare U-Net cannot sample without its text encoder and autoencoder).
PIPELINE_MODEL_TAG = "ldmflow.pipeline_model"
KIND_TAG = "ldmflow.model_kind"     # "pipeline" on versions registered by log_pipeline_model
SEED_BITS = 63                      # seeds are non-negative int64 (torch.Generator.manual_seed, parquet)


def derive_seed(prompt_id: str, global_seed: int) -> int:
    """The seed of one image: a hash of (global seed, prompt id), so it does not depend on where
    the prompt sits in a batch, a shard or the file. Stable across processes and Python versions
    (sha256, not hash())."""
    digest = hashlib.sha256(f"{int(global_seed)}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


SAMPLING_PRECISIONS = ("fp32", "bf16")


@dataclass
class SamplerSettings:
    """How a bundle samples. Saved in bundle.json as the defaults; `ldmflow generate` overrides."""
    sampler: str = "ddim"           # a key of models.samplers.SAMPLERS
    spacing: str = "trailing"       # timestep spacing (diffusers' options)
    steps: int = 50                 # sampler steps
    guidance_scale: float = 4.0     # classifier-free guidance; 1 = off
    eta: float = 0.0                # ddim only
    use_ema: bool = True            # unet_ema/ when the bundle has it
    resolution: int | None = None   # output side in pixels; None = the autoencoder's training resolution
    seed: int = 0                   # global seed that per-image seeds derive from
    # Speed, measured in BENCHMARKS.md. precision "bf16": the U-Net runs as a bfloat16 copy (the
    # sampler's arithmetic, text encoder and decoder stay float32); compile: torch.compile the
    # U-Net once per actor (minutes of compile; a fixed batch shape, partial batches are padded).
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self):
        from models.samplers import SAMPLERS, SPACINGS
        if self.precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(SAMPLING_PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: expected true or false, got {self.compile!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: expected a number >= 0, got {self.guidance_scale!r}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta: only the ddim sampler takes eta, got eta={self.eta} with {self.sampler!r}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 8):
            raise ValueError(f"resolution: expected an int >= 8 or None, got {self.resolution!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        self.guidance_scale = float(self.guidance_scale)
        self.eta = float(self.eta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a sampler setting (expected {', '.join(sorted(known))})")
        return cls(**d)

    def replace(self, **changes: Any) -> "SamplerSettings":
        """A copy with the non-None `changes` applied (CLI options left out keep the bundle's)."""
        return SamplerSettings.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


@dataclass
class ModelBundle:
    """Where a bundle's parts are. The parts may live apart (a pipeline output directory)."""
    diffusion_dir: str
    autoencoder_dir: str
    text_encoder_dir: str
    null_text_file: str
    scale_factor: float             # multiplies the autoencoder latent before diffusion
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    lineage: dict[str, str] = field(default_factory=dict)   # versions, hashes, cache key, code version

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ModelBundle":
        """A bundle directory written by `write_bundle` (or the pyfunc's artifact)."""
        d = Path(directory)
        meta_file = d / BUNDLE_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{d}: no {BUNDLE_FILE}; not an ldmflow model bundle")
        meta = json.loads(meta_file.read_text())
        return cls(diffusion_dir=str(d / "diffusion"), autoencoder_dir=str(d / "autoencoder"),
                   text_encoder_dir=str(d / "text_encoder"), null_text_file=str(d / "null_text.npz"),
                   scale_factor=float(meta["scale_factor"]),
                   settings=SamplerSettings.from_dict(meta["settings"]), lineage=dict(meta.get("lineage", {})))

    def content_hash(self) -> str:
        """Hash of the weights and conditioning that decide the images (not of the default
        settings: a job records its resolved settings itself)."""
        from pipelines.lineage import dir_hash, file_sha256
        h = hashlib.sha256()
        for part in (dir_hash(self.diffusion_dir), dir_hash(self.autoencoder_dir),
                     dir_hash(self.text_encoder_dir), file_sha256(self.null_text_file), repr(self.scale_factor)):
            h.update(part.encode())
        return h.hexdigest()[:16]


def bundle_from_pipeline(output_dir: str | Path) -> ModelBundle:
    """The bundle of a finished pipeline output directory (its stages' artifact.json files), with
    the pipeline's sample section as default settings."""
    from pipelines.lineage import read_artifact_json
    out = Path(output_dir)
    arts = {}
    for stage in ("diffusion", "autoencoder", "cache"):
        art = read_artifact_json(out / stage)
        if art is None:
            raise FileNotFoundError(f"{out}: no finished {stage} stage ({out / stage / 'artifact.json'}); "
                                    f"not a finished ldmflow pipeline output directory")
        arts[stage] = art
    settings = SamplerSettings()
    marker = out / "pipeline.json"
    if marker.is_file():
        s = json.loads(marker.read_text()).get("config", {}).get("sample", {})
        settings = SamplerSettings(**{k: s[k] for k in ("sampler", "spacing", "steps", "guidance_scale", "eta",
                                                        "use_ema", "seed", "precision", "compile") if k in s})
    diff, ae, cache = arts["diffusion"], arts["autoencoder"], arts["cache"]
    return ModelBundle(diffusion_dir=diff["directory"], autoencoder_dir=ae["directory"],
                       text_encoder_dir=cache["text_encoder_dir"], null_text_file=cache["null_text_file"],
                       scale_factor=float(cache["scale_factor"]), settings=settings,
                       lineage=_lineage(diff, ae, cache))


def _lineage(diff: Any, ae: Any, cache: Any) -> dict[str, str]:
    from pipelines.lineage import code_version
    get = (lambda o, k: o.get(k) if isinstance(o, dict) else getattr(o, k))
    return {k: str(v) for k, v in {
        "diffusion_model_version": get(diff, "model_version"), "diffusion_hash": get(diff, "diffusion_hash"),
        "diffusion_run_id": get(diff, "run_id"),
        "autoencoder_model_version": get(ae, "model_version"), "autoencoder_hash": get(ae, "autoencoder_hash"),
        "latent_cache_key": get(cache, "key"), "text_encoder_hash": get(cache, "text_encoder_hash"),
        "code_version": code_version()}.items() if v is not None}


def write_bundle(bundle: ModelBundle, directory: str | Path) -> Path:
    """Copy `bundle` into one self-contained directory (bundle.json last: its presence says the
    copy is complete)."""
    d = Path(directory)
    if (d / BUNDLE_FILE).exists():
        raise FileExistsError(f"{d}: already holds a bundle")
    d.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle.diffusion_dir, d / "diffusion", dirs_exist_ok=True)
    shutil.copytree(bundle.autoencoder_dir, d / "autoencoder", dirs_exist_ok=True)
    shutil.copytree(bundle.text_encoder_dir, d / "text_encoder", dirs_exist_ok=True)
    shutil.copy(bundle.null_text_file, d / "null_text.npz")
    meta = {"scale_factor": bundle.scale_factor, "settings": bundle.settings.to_dict(), "lineage": bundle.lineage}
    (d / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore. Generation actors run with 1 thread; a CPU
    regeneration bit-exact with them must use the same count (reductions split by thread)."""
    import torch
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class BundleSampler:
    """A bundle's models loaded once; `sample(prompts, seeds)` -> uint8 images (N, H, W, 3).

    An image's initial noise is drawn from its own seed. The deterministic samplers (ddim eta 0,
    dpmpp_2m, euler, flow_euler) then make each image a function of (prompt, seed, settings,
    model) up to floating-point effects of the batch it ran in; the stochastic ones (ddpm, ddim
    eta > 0) draw per-step noise from one generator seeded by the batch's first seed, so their
    images depend on the batch too. `ldmflow generate` fixes every batch's composition, which
    makes both kinds reproducible bit for bit (pipelines.generate.regenerate)."""

    def __init__(self, bundle: ModelBundle, settings: SamplerSettings | None = None, device: str | None = None,
                 streams: int | None = None):
        import torch
        from models.autoencoders import load_autoencoder
        from models.checkpoint import load_state
        from models.denoiser import ObjectiveConfig, build_denoiser
        from models.inference import BatchStreams, export_frozen
        from models.latent_norm import LatentNorm
        from models.samplers import SAMPLERS, sampler_timesteps
        from models.schedules import ScheduleConfig
        from models.text import load_text_encoder
        from models.unet import UNet, UNetConfig
        self.torch = torch
        self.bundle = bundle
        self.settings = s = settings or bundle.settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # CPU: the guided batch runs as one part per intra-op thread, each part on one thread
        # (models.inference.BatchStreams; on 2 cores 1.07x / 1.08x the images/s of one stream
        # eager; compiled, the same on a quiet machine and more under load: BENCHMARKS.md). A Ray
        # actor holding one CPU runs one stream, as before; `ldmflow generate`'s bit-for-bit
        # regeneration relies on its actors' single thread. None = one stream per thread on the
        # CPU, one elsewhere.
        if streams is None:
            streams = torch.get_num_threads() if self.device.type == "cpu" else 1
        ddir = Path(bundle.diffusion_dir)
        unet_dir = ddir / ("unet_ema" if s.use_ema and (ddir / "unet_ema").is_dir() else "unet")
        cfg, state, _ = load_state(unet_dir)
        unet = UNet(UNetConfig.from_dict(cfg))
        unet.load_state_dict(state)
        schedule = ScheduleConfig.from_dict(json.loads((ddir / "schedule.json").read_text()))
        obj_file = ddir / "objective.json"   # models saved before it existed are eps-prediction
        objective = ObjectiveConfig.from_dict(json.loads(obj_file.read_text())) if obj_file.is_file() else ObjectiveConfig()
        if s.precision == "bf16":
            # A bfloat16 copy of the weights (no autocast: nothing is cast per op); the U-Net casts
            # the float32 latents and text states it is given, the denoiser's preconditioning and
            # the sampler's update stay float32.
            unet.to(torch.bfloat16)
        self.denoiser = build_denoiser(unet, schedule, objective).eval().to(self.device)
        self.net_fn = BatchStreams(self.denoiser, streams)
        self._compiled_batch = 0
        if s.compile:
            # In place (state dict keys unchanged), the weights frozen into the graph (inductor
            # pre-packs them for oneDNN on the CPU; 20% off a bf16 forward, models/inference.py),
            # with no per-call guards, so the streams run it at once. Static shapes: sample() pads a
            # smaller batch up to the compiled one instead of compiling again.
            export_frozen(unet)
        self.sample_fn = SAMPLERS[s.sampler]
        # Raises here, before any prompt: too many steps, or a flow sampler on a diffusion model.
        self.timesteps = sampler_timesteps(s.sampler, schedule.num_timesteps, s.steps, s.spacing)
        self.alphas_cumprod = schedule.alphas_cumprod()
        self.ae, ae_extra = load_autoencoder(bundle.autoencoder_dir)
        self.ae.eval().to(self.device)
        # The autoencoder's own latent normalisation (per-tensor scale, or per-channel shift and
        # scale), the one the cache applied and diffusion trained in.
        self.norm = LatentNorm.from_extra(ae_extra)
        self.text = load_text_encoder(bundle.text_encoder_dir).eval().to(self.device)
        null = np.load(bundle.null_text_file)
        self.null_ctx = torch.from_numpy(null["states"]).float().to(self.device)   # (L, D)
        self.null_mask = torch.from_numpy(null["mask"]).to(self.device)            # (L,)
        self.latent_c = unet.config.in_channels
        ae_cfg = getattr(self.ae.config, "autoencoder", self.ae.config)   # a VQ config nests the KL layout
        factor = ae_cfg.downsample_factor
        res = s.resolution or ae_cfg.resolution
        if res % factor:
            raise ValueError(f"resolution: expected a multiple of the autoencoder's downsampling factor "
                             f"({factor}), got {res}")
        self.resolution = res
        self.latent_hw = res // factor

    @property
    def streams(self) -> int:
        """How many parts the U-Net's batch runs in at once (models.inference.BatchStreams)."""
        return self.net_fn.streams

    def sample(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """(N,) prompts and seeds -> (N, H, W, 3) uint8 RGB."""
        torch = self.torch
        from models.samplers import cfg_model
        if len(prompts) != len(seeds):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        if not prompts:
            return np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        n = len(prompts)
        if self.settings.compile:
            # Pad to the compiled batch (repeating the last prompt and seed), keep the first n.
            self._compiled_batch = max(self._compiled_batch, n)
            pad = self._compiled_batch - n
            prompts, seeds = list(prompts) + [prompts[-1]] * pad, list(seeds) + [seeds[-1]] * pad
        h = w = self.latent_hw
        # Per-image generators: an image's starting noise depends on its seed alone.
        noise = torch.stack([torch.randn((self.latent_c, h, w), generator=torch.Generator().manual_seed(int(sd)))
                             for sd in seeds]).to(self.device)                  # (N, C, h, w)
        s = self.settings
        with torch.no_grad():
            ctx, mask = self.text.encode(list(prompts))                         # (N, L, D), (N, L)
            model = cfg_model(self.net_fn, s.guidance_scale)
            # Stochastic samplers' per-step noise: one generator per batch (see the class docstring).
            gen = torch.Generator().manual_seed((int(seeds[0]) + 1) % (1 << SEED_BITS))
            options = {"eta": s.eta} if s.sampler == "ddim" else {}
            z = self.sample_fn(model, noise, self.timesteps, self.alphas_cumprod,
                               extra_args={"context": ctx.to(self.device), "context_mask": mask.to(self.device),
                                           "null_context": self.null_ctx, "null_mask": self.null_mask},
                               generator=gen, **options)
            z = z[:n].float()
            x = self.ae.decode(self.norm.denormalize(z)).float().clamp(-1, 1).cpu()   # (N, 3, H, W)
        # The same quantisation as pipelines.images.to_pil.
        return ((x.numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1).copy()


@dataclass
class BaselineBundle:
    """A baseline family's model directory (models.baselines.save_baseline) as a generation model:
    unconditional, so prompts only name and seed the images."""
    model_dir: str
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    lineage: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def is_baseline_dir(directory: str | Path) -> bool:
        f = Path(directory) / "config.json"
        if not (f.is_file() and (Path(directory) / "model.safetensors").is_file()):
            return False
        try:
            return "family" in json.loads(f.read_text())
        except json.JSONDecodeError:
            return False

    @property
    def family(self) -> str:
        return json.loads((Path(self.model_dir) / "config.json").read_text())["family"]

    def content_hash(self) -> str:
        from pipelines.lineage import dir_hash
        return dir_hash(self.model_dir)


class BaselineSampler:
    """`sample(prompts, seeds)` -> uint8 images (N, H, W, 3) from a baseline family. The batch's
    noise comes from one generator seeded by its first seed (families sample a batch at once), so an
    image depends on its batch; `ldmflow generate` fixes batch composition, which makes it
    reproducible bit for bit, like the stochastic diffusion samplers."""

    def __init__(self, bundle: BaselineBundle, settings: SamplerSettings | None = None, device: str | None = None):
        import torch
        from models.baselines import load_baseline
        self.torch = torch
        self.bundle = bundle
        self.settings = settings or bundle.settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _ = load_baseline(bundle.model_dir, map_location="cpu")
        self.model.to(self.device).eval()
        self.resolution = self.model.config.resolution

    def sample(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        torch = self.torch
        if len(prompts) != len(seeds):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        if not prompts:
            return np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]))
        with torch.no_grad():
            x = self.model.sample(len(prompts), generator=gen).float().clamp(-1, 1).cpu()   # (N, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x.numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1).copy()


def make_sampler(bundle, settings: SamplerSettings | None = None, device: str | None = None):
    """The sampler for a bundle: the text -> image pipeline or a baseline family."""
    if isinstance(bundle, BaselineBundle):
        return BaselineSampler(bundle, settings, device)
    return BundleSampler(bundle, settings, device)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic: no timestamps, fixed compression)."""
    from PIL import Image
    from pipelines.shards import encode_png
    return encode_png(Image.fromarray(image))


def _prompt_frame(model_input: Any):
    import pandas as pd
    if isinstance(model_input, pd.DataFrame):
        df = model_input
    elif isinstance(model_input, pd.Series):
        df = model_input.to_frame("prompt")
    elif isinstance(model_input, str):
        df = pd.DataFrame({"prompt": [model_input]})
    elif isinstance(model_input, dict):
        df = pd.DataFrame(model_input)
    else:
        df = pd.DataFrame({"prompt": list(np.asarray(model_input, dtype=object).reshape(-1))})
    if "prompt" not in df.columns:
        if df.shape[1] == 1:
            df = df.rename(columns={df.columns[0]: "prompt"})
        else:
            raise ValueError(f"prompt: expected a 'prompt' column, got columns {list(df.columns)}")
    bad = [i for i, p in enumerate(df["prompt"]) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompt: row {bad[0]} is not a string ({df['prompt'].iloc[bad[0]]!r})")
    return df.reset_index(drop=True)


class LdmPipelineModel(PythonModel):
    """MLflow pyfunc over a bundle (artifact "bundle"). See the module docstring for predict's
    input and output; `params` may override batch_size (default 16)."""

    def load_context(self, context) -> None:
        self.bundle = ModelBundle.from_dir(context.artifacts[ARTIFACT_NAME])
        self.sampler = BundleSampler(self.bundle)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        df = _prompt_frame(model_input)
        ids = ([str(v) for v in df["id"]] if "id" in df.columns else [str(i) for i in range(len(df))])
        if "seed" in df.columns:
            seeds = [int(v) for v in df["seed"]]
        else:
            seeds = [derive_seed(i, self.bundle.settings.seed) for i in ids]
        batch = int((params or {}).get("batch_size", 16))
        images: list[bytes] = []
        prompts = list(df["prompt"])
        for i in range(0, len(prompts), batch):
            for img in self.sampler.sample(prompts[i:i + batch], seeds[i:i + batch]):
                images.append(png_bytes(img))
        return pd.DataFrame({"prompt": prompts, "id": ids, "seed": seeds, "image": images})


def _pip_requirements() -> list[str]:
    """Pinned to this environment: the pyfunc must rebuild the same networks (no inference pass,
    which would load the model in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version
    reqs = []
    for dist in ("torch", "numpy", "pandas", "pillow", "safetensors", "open_clip_torch", "webdataset",
                 "braceexpand", "pyyaml", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


@contextmanager
def _existing_cwd(fallback: str) -> Iterator[None]:
    """mlflow's save_model calls Path.cwd(). Seen in the two-node `ldmflow submit` test: the Ray
    job's unpacked working_dir had been removed under the running driver by the time the samples
    stage saved the pyfunc (FileNotFoundError from os.getcwd). Run in `fallback` then."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(fallback)
    yield


def save_pipeline_model(bundle: ModelBundle, path: str | Path) -> Path:
    """Save the pyfunc (MLmodel, the bundle as its artifact, this project's models/ and pipelines/
    packages as code_paths so it loads in a fresh process without ldmflow installed)."""
    import mlflow.pyfunc
    import models
    import pipelines
    # Each package where it was imported from: under a Ray job's runtime_env py_modules they are
    # unpacked into separate directories, not siblings of one project root.
    code = [str(Path(pkg.__file__).resolve().parent) for pkg in (models, pipelines)]
    with tempfile.TemporaryDirectory(prefix="ldmflow-bundle-") as tmp, _existing_cwd(tmp):
        bundle_dir = write_bundle(bundle, Path(tmp) / ARTIFACT_NAME)
        mlflow.pyfunc.save_model(str(path), python_model=LdmPipelineModel(),
                                 artifacts={ARTIFACT_NAME: str(bundle_dir)},
                                 code_paths=code,
                                 pip_requirements=_pip_requirements(),
                                 metadata={"ldmflow_lineage": bundle.lineage})
    return Path(path)


def log_pipeline_model(tracker, run_id: str, diffusion_artifact, autoencoder_artifact, cache_artifact,
                       sample_config, registered_name: str, aliases: list[str] | tuple[str, ...] = ()) -> str:
    """Log the trained pipeline as a pyfunc under `run_id` (artifact path "pipeline_model") and
    register it as `registered_name`; returns the version. Lineage tags on the version name the
    U-Net / autoencoder versions and the latent cache; the U-Net's own model version (if any) gets
    a tag pointing back here, so `ldmflow generate --model models:/<prefix>-unet/V` finds it."""
    from pipelines.tracking import TAG
    settings = SamplerSettings(**{k: getattr(sample_config, k) for k in
                                  ("sampler", "spacing", "steps", "guidance_scale", "eta", "use_ema", "seed",
                                   "precision", "compile")})
    bundle = ModelBundle(diffusion_dir=diffusion_artifact.directory, autoencoder_dir=autoencoder_artifact.directory,
                         text_encoder_dir=cache_artifact.text_encoder_dir,
                         null_text_file=cache_artifact.null_text_file,
                         scale_factor=float(cache_artifact.scale_factor), settings=settings,
                         lineage=_lineage(diffusion_artifact, autoencoder_artifact, cache_artifact))
    with tempfile.TemporaryDirectory(prefix="ldmflow-pyfunc-") as tmp:
        local = save_pipeline_model(bundle, Path(tmp) / MODEL_ARTIFACT_PATH)
        tracker.log_artifacts(run_id, local, MODEL_ARTIFACT_PATH)
    tags = {KIND_TAG: "pipeline", TAG["diffusion_version"]: diffusion_artifact.model_version or "",
            TAG["diffusion_hash"]: diffusion_artifact.diffusion_hash,
            TAG["autoencoder_version"]: autoencoder_artifact.model_version or "",
            TAG["autoencoder_hash"]: autoencoder_artifact.autoencoder_hash,
            TAG["latent_cache_key"]: cache_artifact.key, TAG["text_encoder_hash"]: cache_artifact.text_encoder_hash,
            "ldmflow.diffusion_run_id": diffusion_artifact.run_id or ""}
    version = tracker.register_model(registered_name, run_id, MODEL_ARTIFACT_PATH, aliases=list(aliases), tags=tags,
                                     description="ldmflow pipeline (text encoder + U-Net + autoencoder + "
                                                 "sampler settings) as an mlflow pyfunc: predict(prompts) -> "
                                                 "DataFrame(prompt, id, seed, image PNG bytes)")
    if diffusion_artifact.run_id:
        client = tracker.client
        for mv in client.search_model_versions(f"run_id = '{diffusion_artifact.run_id}'"):
            client.set_model_version_tag(mv.name, mv.version, PIPELINE_MODEL_TAG,
                                         f"models:/{registered_name}/{version}")
    return version
