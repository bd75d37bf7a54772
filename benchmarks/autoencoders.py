"""Train and score an autoencoder recipe: the data and autoencoder stages of a pipeline config.

    python benchmarks/autoencoders.py pipelines/configs/emoji_kl_f4.yaml [section.key=value ...]

Runs the pipeline's own data and autoencoder stages (Ray Train, MLflow tracking in the config's
output directory) and prints a RESULTS.md row: validation PSNR / SSIM / rFD (EfficientNet-Lite0
features: NOT comparable to Inception rFID), codebook perplexity and usage for VQ, training
images/s (the optimizer steps alone, all ranks) and the stage's wall time (Ray start-up, training,
latent normalisation and evaluation).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    from cluster.runtime import ray_session, worker_env
    from pipelines.config import load_config
    from pipelines.data import prepare_data
    from pipelines.lineage import code_version, read_artifact_json, write_artifact_json
    from pipelines.stage import DatasetArtifact, StageContext
    from pipelines.tracking import Tracker
    from pipelines.train_autoencoder import train_autoencoder

    cfg = load_config(argv[0], argv[1:])
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = worker_env(cfg.cluster.torch_extensions_dir)
    with ray_session(cfg.cluster.address, cfg.cluster.num_cpus, env):
        tracker = Tracker.embedded(out, cfg.tracking.uri, cfg.tracking.artifact_location, cfg.tracking.experiment)
        run_id = tracker.start_run(f"{cfg.name}-autoencoder-recipe")
        ctx = StageContext(config=cfg, output_dir=out, tracker=tracker, pipeline_run_id=run_id,
                           code_version=code_version(), env=env)
        done = read_artifact_json(out / "data")
        if done is None:
            data = prepare_data(cfg.data, ctx)
            write_artifact_json(out / "data", data)
        else:
            data = DatasetArtifact(**done)
        t0 = time.time()
        ae = train_autoencoder(cfg.autoencoder, data, ctx)
        wall = time.time() - t0
        tracker.end_run(run_id)
    m = ae.metrics
    a = cfg.autoencoder
    row = {"config": argv[0], "family": a.family, "f": a.model.downsample_factor,
           "latent": list(a.model.latent_shape) if hasattr(a.model, "latent_shape") else None,
           "steps": a.max_steps, "batch": a.batch_size * a.num_workers, "train_images": data.num_train,
           "val_images": int(m.get("val/images", 0)),
           "psnr": round(m["val/psnr"], 2), "ssim": round(m.get("val/ssim", float("nan")), 4),
           "rfd_effnet_lite0": round(m.get("val/rfd_effnet_lite0", float("nan")), 3),
           "perplexity": round(m["val/perplexity"], 1) if "val/perplexity" in m else None,
           "codebook_usage": round(m["val/codebook_usage"], 3) if "val/codebook_usage" in m else None,
           "train_images_per_s": round(m.get("train/images_per_s", float("nan")), 1),
           "stage_wall_s": round(wall), "code_version": ctx.code_version}
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or ["pipelines/configs/emoji_kl_f4.yaml"])
