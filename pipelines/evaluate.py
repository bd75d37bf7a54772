"""The `evaluate` stage: one set of scores for any model, a baseline family or the latent diffusion
pipeline, on the held-out split.

- Samples are made through `ldmflow generate` (pipelines/generate.py: Ray Data actors, shards and a
  manifest, exactly once), one per held-out caption in turn (`num_samples` in all); unconditional
  families ignore the captions. Sampling images/s is that job's throughput.
- Fréchet distance and k-NN precision/recall (Kynkäänniemi et al. 2019) between the samples and the
  held-out images, on EfficientNet-Lite0 ImageNet features (pooled 1280-d): NOT comparable to
  published Inception FID. With `features: inception` and a user-supplied weights file, InceptionV3
  pool features (the FID network) are used instead.
- Bits per dimension on held-out images for likelihood models (exact or a bound, as the family
  says); "n/a" for models without one (GANs) and for the latent diffusion model (its ELBO is over
  latents, not pixels).
- Training wall time (from the training stage) and, for text-conditioned models on the shapes data,
  the exact verifier's pass rate (pipelines/datasets/shapes.py).

Metrics that do not apply are the string "n/a" with the reason in `notes`, never a crash.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.config import EvaluateConfig
from pipelines.stage import DatasetArtifact, EvaluationArtifact, StageContext

NA = "n/a"
FEATURE_NOTE = {"efficientnet_lite0": "EfficientNet-Lite0 ImageNet pooled features; not comparable to Inception FID",
                "inception": "InceptionV3 pool3 features (FID network, user-supplied weights)"}


@dataclass
class EvalTarget:
    """What the evaluate stage scores."""
    name: str                    # a baseline family or "ldm"
    model_source: str            # what `ldmflow generate --model` takes (a directory)
    model_hash: str
    train_seconds: float | None  # training wall time of the model (all its training stages)
    train_cpu_seconds: float | None = None   # CPU seconds per training worker, where measured
    baseline_dir: str | None = None   # a baseline's model dir (for bits/dim); None for the LDM
    text_conditional: bool = False
    generate_overrides: dict = field(default_factory=dict)   # sampler settings for generate


def _val_samples(data: DatasetArtifact, limit: int):
    from pipelines.shards import decode_sample, iter_samples
    n = 0
    for s in iter_samples(data.val_urls or data.train_urls):
        if limit and n >= limit:
            return
        yield decode_sample(s)
        n += 1


def _images_tensor(images: list, resolution: int):
    """PIL images -> (N, 3, R, R) float tensor in [-1, 1]."""
    import torch
    from pipelines.shards import image_to_tensor_array
    return torch.from_numpy(np.stack([image_to_tensor_array(im, resolution) for im in images]))


def _generated_images(out: str) -> tuple[list, list[str]]:
    """The PNGs and prompts of a finished generate job, in manifest order."""
    import io
    from PIL import Image
    from pipelines.generate import read_manifest
    from pipelines.shards import iter_samples
    table = read_manifest(out).to_pylist()
    by_shard: dict[str, dict] = {}
    for shard in sorted({r["shard"] for r in table}):
        by_shard[shard] = {s["__key__"]: s for s in iter_samples([str(Path(out) / shard)])}
    images, prompts = [], []
    for r in table:
        s = by_shard[r["shard"]][r["key"]]
        images.append(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        prompts.append(r["prompt"])
    return images, prompts


def _feature_net(cfg: EvaluateConfig):
    from models.metrics import EfficientNetLite0PooledFeatures, InceptionV3PooledFeatures
    if cfg.features == "inception":
        return InceptionV3PooledFeatures(cfg.inception_weights)
    return EfficientNetLite0PooledFeatures()


def _features(net, x, batch: int = 64):
    import torch
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def bits_per_dim(model_dir: str, images, batch: int = 32) -> tuple[float | str, str]:
    """(mean bits/dim over `images`, likelihood kind) of a baseline, or ("n/a", reason)."""
    import torch
    from models.baselines import NoLikelihood, load_baseline
    model, _ = load_baseline(model_dir)
    if not model.has_likelihood:
        return NA, f"{model.family} has no likelihood"
    total, n = 0.0, 0
    torch.manual_seed(0)   # dequantisation noise, where a family draws it: the same every evaluation
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            try:
                b = model.bits_per_dim(x)
            except NoLikelihood as e:
                return NA, str(e)
            total += float(b.double().sum())
            n += x.shape[0]
    return total / n, model.likelihood_kind


def evaluate(cfg: EvaluateConfig, target: EvalTarget, data: DatasetArtifact, ctx: StageContext,
             stage_name: str = "evaluate") -> EvaluationArtifact:
    """Score `target` (see the module docstring). Resumable: the generate job continues where it
    stopped; everything else is recomputed from its outputs."""
    import torch
    from models.metrics import FeatureStats, frechet_distance, knn_precision_recall
    from pipelines.generate import GenerateConfig, generate
    from pipelines.images import grid
    out = ctx.stage_dir(stage_name)
    res = ctx.config.data.resolution
    real = list(_val_samples(data, cfg.real_images))
    if len(real) < 2:
        raise ValueError(f"evaluate: needs at least 2 held-out images, the dataset has {len(real)} "
                         f"(data.num_val)")
    captions = [s.get("txt", "") or "an image" for s in real]
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(cfg.num_samples):
            f.write(json.dumps({"id": f"s{i:07d}", "prompt": captions[i % len(captions)]}) + "\n")
    notes = {"features": FEATURE_NOTE[cfg.features]}
    with ctx.stage_run(stage_name, cfg, {"ldmflow.evaluated": target.name, "ldmflow.model_hash": target.model_hash,
                                         "ldmflow.dataset_hash": data.dataset_hash}) as run_id:
        gen = generate(GenerateConfig(model=target.model_source, prompts=str(prompts), out=str(out / "samples"),
                                      batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                                      seed=cfg.seed, tracking_uri=ctx.tracker.uri, progress=False,
                                      use_gpu=ctx.config.cluster.use_gpu, **target.generate_overrides))
        fake_imgs, fake_prompts = _generated_images(str(out / "samples"))
        torch.manual_seed(0)
        from pipelines.shards import image_of
        real_x = _images_tensor([image_of(s) for s in real], res)
        fake_x = _images_tensor(fake_imgs, res)
        net = _feature_net(cfg).eval()
        fr, ff = _features(net, real_x), _features(net, fake_x)
        sr, sf = FeatureStats(fr.shape[1], "cpu"), FeatureStats(ff.shape[1], "cpu")
        sr.update(fr)
        sf.update(ff)
        metrics: dict[str, float | str] = {
            "fd": frechet_distance(sr.mean(), sr.cov(), sf.mean(), sf.cov()),
            "num_samples": float(len(fake_imgs)), "num_real": float(len(real)),
            "sample_images_per_s": gen.images_per_s if gen.num_generated else NA,
            "train_seconds": target.train_seconds if target.train_seconds is not None else NA,
            "train_cpu_seconds": target.train_cpu_seconds if target.train_cpu_seconds is not None else NA,
        }
        p, r = knn_precision_recall(fr.float(), ff.float(), k=cfg.knn_k)
        metrics.update({"precision": p, "recall": r})
        if not gen.num_generated:
            notes["sample_images_per_s"] = "samples were made by an earlier attempt of this stage"
        if target.baseline_dir:
            bpd_n = cfg.bpd_images or len(real)
            bpd, kind = bits_per_dim(target.baseline_dir, real_x[:bpd_n])
            metrics["bpd"] = bpd
            notes["bpd"] = kind   # exact / bound, or why there is none
        else:
            metrics["bpd"] = NA
            notes["bpd"] = "latent diffusion: its ELBO is over autoencoder latents, not pixels"
        if target.text_conditional and ctx.config.data.source == "shapes":
            from pipelines.datasets.shapes import verify
            ok = [verify(im, pr) for im, pr in zip(fake_imgs, fake_prompts)]
            metrics["verifier_pass_rate"] = float(np.mean(ok))
        else:
            metrics["verifier_pass_rate"] = NA
            notes["verifier_pass_rate"] = ("unconditional model" if not target.text_conditional
                                           else f"no exact verifier for data.source={ctx.config.data.source}")
        grid_path = out / "samples.png"
        from pipelines.images import to_pil
        grid([to_pil(x) for x in fake_x[:16]], scale=2).save(grid_path)
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "notes": notes}, indent=2))
        ctx.tracker.log_metrics(run_id, {k: float(v) for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and math.isfinite(v)})
        ctx.tracker.log_dict(run_id, {"metrics": metrics, "notes": notes}, "metrics.json")
        ctx.tracker.log_artifact(run_id, grid_path, "images")
        return EvaluationArtifact(directory=str(out), model=target.name, model_hash=target.model_hash,
                                  dataset_hash=data.dataset_hash, metrics={**metrics, **{f"note.{k}": v for k, v in notes.items()}},
                                  run_id=run_id)
