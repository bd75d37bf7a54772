"""The sampler's speed options against the plain path, on a tiny random bundle: a bfloat16 U-Net
copy, torch.compile (with partial batches padded to the compiled shape), and the autoencoder's own
latent normalisation on the way to the decoder."""
import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, SampleConfig
from pipelines.pyfunc import BundleSampler, ModelBundle, SamplerSettings
from tests.gen_fixtures import tiny_bundle

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a star"]
SEEDS = [3, 14, 15]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return ModelBundle.from_dir(tiny_bundle(tmp_path_factory.mktemp("speed")))


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


def test_bf16_unet_copy_is_close_to_float32(bundle):
    plain = BundleSampler(bundle)
    fast = BundleSampler(bundle, bundle.settings.replace(precision="bf16"))
    assert fast.denoiser.net.out_conv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.ae.parameters())    # the decoder stays float32
    a = plain.sample(PROMPTS, SEEDS).astype(np.int16)
    b = fast.sample(PROMPTS, SEEDS).astype(np.int16)
    assert a.shape == b.shape == (3, 16, 16, 3)
    diff = np.abs(a - b)
    # bfloat16 keeps 8 mantissa bits: a few levels of 255 on average, never a different image.
    assert diff.mean() < 4.0 and np.percentile(diff, 99) < 24, (diff.mean(), diff.max())
    assert not np.array_equal(a, b)     # it really ran in bfloat16


def test_compiled_unet_matches_eager_and_pads_partial_batches(bundle):
    plain = BundleSampler(bundle)
    fast = BundleSampler(bundle, bundle.settings.replace(compile=True))
    full = fast.sample(PROMPTS, SEEDS)
    assert fast._compiled_batch == 3
    part = fast.sample(PROMPTS[:2], SEEDS[:2])            # padded to 3 inside, 2 returned
    assert part.shape == (2, 16, 16, 3) and fast._compiled_batch == 3
    ref_full, ref_part = plain.sample(PROMPTS, SEEDS), plain.sample(PROMPTS[:2], SEEDS[:2])
    # Fused kernels round differently from eager ones: at most one level of 255 apart.
    for got, ref in ((full, ref_full), (part, ref_part)):
        assert np.abs(got.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_streamed_sampler_matches_one_stream_compiled_or_not(bundle):
    """The guided batch split across 2 worker threads (models.inference.BatchStreams): the same
    images as the one-stream sampler, eager and compiled (export_frozen: graphs without per-call
    guards, one per stream size and thread count)."""
    plain = BundleSampler(bundle)
    assert plain.streams == 1          # auto: one stream per intra-op thread (1 here, see the fixture)
    ref = plain.sample(PROMPTS, SEEDS).astype(np.int16)
    two = BundleSampler(bundle, streams=2)
    assert two.streams == 2
    assert np.abs(two.sample(PROMPTS, SEEDS).astype(np.int16) - ref).max() <= 1
    assert torch.get_num_threads() == 1   # the caller's count survives the 1-thread workers
    compiled = BundleSampler(bundle, bundle.settings.replace(compile=True), streams=2)
    for _ in range(3):   # the two streams share one graph; repeated concurrent calls stay exact
        assert np.abs(compiled.sample(PROMPTS, SEEDS).astype(np.int16) - ref).max() <= 1
    graphs = compiled.denoiser.net.forward.graphs
    assert len(graphs) == 1 and next(iter(graphs))[0] == 1   # one graph, built for 1-thread streams
    with pytest.raises(ValueError, match="^streams: expected an int >= 1"):
        BundleSampler(bundle, streams=0)
    torch.set_num_threads(2)
    try:
        assert BundleSampler(bundle).streams == 2
        assert BundleSampler(bundle, bundle.settings.replace(compile=True)).streams == 2
    finally:
        torch.set_num_threads(1)


def test_decoder_gets_the_autoencoders_own_latent_normalisation(bundle, tmp_path):
    """A per-channel shift and scale in the autoencoder's artifact (not the bundle's scalar
    scale_factor) maps the sampled latent back before decoding."""
    import json
    import shutil
    from models.latent_norm import LatentNorm
    ae_dir = tmp_path / "autoencoder"
    shutil.copytree(bundle.autoencoder_dir, ae_dir)
    extra_files = [p for p in ae_dir.iterdir() if p.suffix == ".json" and "extra" in json.loads(p.read_text())]
    assert extra_files, "the autoencoder artifact keeps its extra (latent scale) in a json beside the weights"
    f = extra_files[0]
    meta = json.loads(f.read_text())
    norm = LatentNorm("channel", (0.5, -0.25, 0.0, 1.0), (2.0, 0.5, 1.0, 4.0))
    meta["extra"] = {"latent_norm": norm.to_dict()}
    f.write_text(json.dumps(meta))
    s = BundleSampler(ModelBundle(**{**bundle.__dict__, "autoencoder_dir": str(ae_dir)}))
    seen = {}
    real_fn, real_decode = s.sample_fn, s.ae.decode
    s.sample_fn = lambda *a, **k: seen.setdefault("z", real_fn(*a, **k))
    s.ae.decode = lambda z: real_decode(seen.setdefault("decoded", z))
    s.sample(PROMPTS[:2], SEEDS[:2])
    assert torch.allclose(seen["decoded"], norm.denormalize(seen["z"].float()))
    assert not torch.allclose(seen["decoded"], seen["z"] / bundle.scale_factor)


def test_speed_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="^precision: expected"):
        SamplerSettings(precision="fp16")
    with pytest.raises(ValueError, match="^compile: expected"):
        SamplerSettings(compile="yes")
    with pytest.raises(ConfigError, match="precision: expected"):
        SampleConfig(precision="half")
