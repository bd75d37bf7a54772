"""The diffusion stage accepts either autoencoder: a VQ first stage with per-channel latent
normalisation runs the whole tiny pipeline, and sampling decodes through the quantiser."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.run import run_pipeline
from tests.conftest import tiny_overrides

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def test_vq_autoencoder_through_the_pipeline(ray_local, tmp_path):
    from models.latent_norm import LatentNorm
    from pipelines.shards import decode_sample, iter_samples
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run") + [
        "name=tinyvq", "autoencoder.family=vq", "autoencoder.quantizer.codebook_size=32",
        "autoencoder.latent_norm=channel", "clip.enabled=false"])
    res = run_pipeline(cfg)
    ae_cfg = json.loads((Path(res.autoencoder.directory) / "config.json").read_text())
    assert "quantizer" in ae_cfg
    norm = LatentNorm.from_dict(res.cache.latent_norm)
    assert norm.kind == "channel" and len(norm.scale) == 4
    # the cache holds the pre-quantisation latent as the mean, with zero std
    first = decode_sample(next(iter(iter_samples([res.cache.train_urls[0]]))))
    assert np.all(first["std.npy"] == 0) and np.any(first["mean.npy"] != 0)
    cond = json.loads((Path(res.diffusion.directory) / "conditioning.json").read_text())
    assert cond["latent_norm"] == res.cache.latent_norm
    assert res.samples.num_images > 0
