"""The pipeline as an MLflow pyfunc: logged, registered, loaded by models:/ URI, predict -> images."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.pyfunc import (PIPELINE_MODEL_TAG, BundleSampler, ModelBundle, SamplerSettings, derive_seed,
                              log_pipeline_model)
from pipelines.stage import AutoencoderArtifact, DiffusionArtifact, LatentCacheArtifact
from pipelines.tracking import Tracker
from tests.gen_fixtures import tiny_bundle

NAME = "tiny-pipeline"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny bundle logged as a pyfunc under a 'diffusion' run whose U-Net is also registered."""
    root = tmp_path_factory.mktemp("pyfunc")
    bundle = ModelBundle.from_dir(tiny_bundle(root))
    tracker = Tracker.embedded(root, None, None, "pyfunc-test")
    run_id = tracker.start_run("diffusion")
    tracker.log_artifacts(run_id, bundle.diffusion_dir, "diffusion")
    unet_version = tracker.register_model("tiny-unet", run_id, "diffusion", aliases=["candidate"])
    diff = DiffusionArtifact(directory=bundle.diffusion_dir, diffusion_hash="d0", latent_cache_key="k0",
                             model_version=unet_version, run_id=run_id)
    ae = AutoencoderArtifact(directory=bundle.autoencoder_dir, autoencoder_hash="a0", scale_factor=0.5,
                             dataset_hash="h0", model_version="3")
    cache = LatentCacheArtifact(directory=str(root), key="k0", train_urls=[], num_samples=0,
                                text_encoder_dir=bundle.text_encoder_dir, text_encoder_hash="t0",
                                null_text_file=bundle.null_text_file, scale_factor=0.5, latent_shape=[4, 4, 4],
                                text_shape=[8, 32], autoencoder_hash="a0", autoencoder_version="3", dataset_hash="h0")
    sample_cfg = SamplerSettings(steps=3, guidance_scale=3.0, seed=0)
    version = log_pipeline_model(tracker, run_id, diff, ae, cache, sample_cfg, NAME, aliases=["production"])
    tracker.end_run(run_id)
    return tracker, version, bundle


@pytest.fixture
def mlflow_uri(registered):
    import mlflow
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(registered[0].uri)
    mlflow.set_registry_uri(registered[0].uri)
    yield registered[0].uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_pyfunc_predict_is_the_bundle_sampler(tmp_path):
    """Without a registry: the PythonModel over a bundle directory, as load_context gets it."""
    from types import SimpleNamespace
    from pipelines.pyfunc import LdmPipelineModel
    bundle_dir = tiny_bundle(tmp_path)
    model = LdmPipelineModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle_dir)}))
    out = model.predict(None, pd.DataFrame({"prompt": ["a red circle", "a blue square"], "id": ["a", "b"]}))
    assert list(out["seed"]) == [derive_seed("a", 0), derive_seed("b", 0)]
    images = np.stack([_decode(p) for p in out["image"]])
    assert images.shape == (2, 16, 16, 3) and images.std() > 0
    np.testing.assert_array_equal(images, model.sampler.sample(["a red circle", "a blue square"], list(out["seed"])))


@pytest.mark.slow
def test_predict_from_registry_returns_images(registered, mlflow_uri):
    import mlflow.pyfunc
    _, version, bundle = registered
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    out = model.predict(["a red circle", "a blue square"])
    assert list(out.columns) == ["prompt", "id", "seed", "image"]
    assert list(out["id"]) == ["0", "1"]
    assert list(out["seed"]) == [derive_seed("0", 0), derive_seed("1", 0)]
    images = [_decode(p) for p in out["image"]]
    assert all(im.shape == (16, 16, 3) for im in images)
    assert not np.array_equal(images[0], images[1])
    # The pyfunc is the bundle sampler: same prompts, seeds and batch -> the same pixels.
    ref = BundleSampler(bundle).sample(["a red circle", "a blue square"], list(out["seed"]))
    np.testing.assert_array_equal(np.stack(images), ref)
    # By alias, from a DataFrame with explicit seeds: a seed decides the image, the id only derives it.
    df = pd.DataFrame({"prompt": ["a red circle"], "seed": [int(out["seed"][0])], "id": ["other"]})
    again = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(df)
    assert again["seed"][0] == out["seed"][0]
    alone = BundleSampler(bundle).sample(["a red circle"], [int(out["seed"][0])])[0]
    np.testing.assert_array_equal(_decode(again["image"][0]), alone)
    with pytest.raises(ValueError, match="prompt"):
        model.predict(pd.DataFrame({"text": ["a"], "other": ["b"]}))


@pytest.mark.slow
def test_version_lineage_tags_and_unet_redirect(registered):
    from pipelines.generate import ModelRefError, resolve_model
    tracker, version, _ = registered
    mv = tracker.client.get_model_version(NAME, version)
    assert mv.tags["ldmflow.model_kind"] == "pipeline"
    assert mv.tags["ldmflow.latent_cache_key"] == "k0"
    unet = tracker.client.get_model_version_by_alias("tiny-unet", "candidate")
    assert unet.tags[PIPELINE_MODEL_TAG] == f"models:/{NAME}/{version}"
    # The bare U-Net's reference resolves to the pipeline model logged for it.
    res = resolve_model("models:/tiny-unet@candidate", tracker.uri)
    assert (res.name, res.version) == (NAME, version)
    assert res.bundle.settings.steps == 3
    for bad in ("models:/nope/1", f"models:/{NAME}@nope", f"models:/{NAME}/99"):
        with pytest.raises(ModelRefError, match="no registered model"):
            resolve_model(bad, tracker.uri)
    with pytest.raises(ModelRefError, match="NAME@ALIAS"):
        resolve_model("models:/justaname", tracker.uri)


@pytest.mark.slow
def test_loads_in_a_fresh_process(registered, tmp_path):
    """The registered model loads and predicts in a new interpreter started outside the checkout."""
    tracker, version, _ = registered
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1]); "
            f"out = mlflow.pyfunc.load_model('models:/{NAME}/{version}').predict(['a red circle']); "
            "print(len(out), len(out['image'][0]) > 8)")
    r = subprocess.run([sys.executable, "-c", code, tracker.uri], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true",
                                         "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("1 True")
