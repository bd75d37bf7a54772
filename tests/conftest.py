import os

import pytest

from cluster.prebuild import resolve_dir

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# DeepSpeed's JIT ops (the shm comm op) compile once per environment (scripts/setup.sh), not per test run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", resolve_dir())


@pytest.fixture(scope="session")
def ray_local():
    """A Ray of our own for the session, ended by handle (never `ray stop`: that kills every Ray
    of this user on the machine)."""
    import ray
    from cluster.runtime import worker_env
    env = worker_env(os.environ["TORCH_EXTENSIONS_DIR"])
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": env}, logging_level="WARNING")
    yield ctx
    ray.shutdown()


def tiny_overrides(out) -> list[str]:
    """A whole pipeline in seconds: tiny models, a few steps, a few images."""
    return [
        f"output_dir={out}", "name=tiny",
        "data.num_train=128", "data.num_val=32", "data.shard_size=32",
        "autoencoder.model.ch=16", "autoencoder.model.ch_mult=[1, 2, 2]", "autoencoder.max_steps=4",
        "autoencoder.batch_size=8", "autoencoder.log_every=2", "autoencoder.scale_batches=2",
        "clip.enabled=true", "clip.max_steps=3", "clip.batch_size=8", "clip.log_every=1",
        "clip.vision.width=32", "clip.vision.layers=1", "clip.vision.heads=2", "clip.vision.patch_size=8",
        "clip.vision.embed_dim=16",
        "cache.text_encoder.layers=1", "cache.text_encoder.width=32", "cache.text_encoder.heads=2",
        "cache.text_encoder.context_length=8", "cache.batch_size=32", "cache.concurrency=1",
        "diffusion.unet.channels=16", "diffusion.unet.channel_mult=[1, 2]", "diffusion.unet.context_dim=32",
        "diffusion.unet.attention_levels=[1]", "diffusion.unet.num_heads=2",
        "diffusion.max_steps=4", "diffusion.batch_size=8", "diffusion.log_every=2", "diffusion.warmup_steps=2",
        "sample.num_per_prompt=1", "sample.steps=3", "sample.batch_size=4", "sample.concurrency=1",
        "tracking.experiment=tiny",
    ]


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test, then the old count back. Tests of many tiny forward passes
    use it: on a busy 2-core machine a second OpenMP thread spinning against other work costs up
    to ~100x."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
