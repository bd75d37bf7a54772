"""DeepSpeed ZeRO (2 by default; 1 and 3 marked slow) on 2 CPU ranks under Ray Train: steps reduce the loss, every rank saves its
partition, and zero_to_fp32 consolidates a state dict that loads strictly into a fresh U-Net."""
import pytest
import torch

from cluster.train import consolidate_zero_checkpoint, deepspeed_config, fit

UNET = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "num_heads": 2, "context_dim": 8, "in_channels": 4, "out_channels": 4}


def _zero_loop(c):
    import deepspeed
    import torch
    from cluster.train import barrier_report_dir, report, world_info
    from models.denoiser import EpsDenoiser
    from models.schedules import ScheduleConfig
    from models.unet import UNet, UNetConfig

    rank, world = world_info()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    den = EpsDenoiser(UNet(UNetConfig.from_dict(c["unet"])), ScheduleConfig().alphas_cumprod())
    out_dtypes = set()   # what the last conv computes in (bf16 under the engine's autocast)
    den.net.out_conv.register_forward_hook(lambda m, i, o: out_dtypes.add(str(o.dtype)))

    class Loss(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, x0, ctx):
            return self.d.loss(x0, ctx, generator=gen)

    engine, *_ = deepspeed.initialize(model=Loss(den), model_parameters=den.parameters(),
                                      config=c["ds"])
    # Each rank sees different data; the fixed batch lets a few steps show learning.
    data = torch.Generator().manual_seed(rank)
    x0 = torch.randn(8, 4, 8, 8, generator=data) * 0.1 + 0.5
    ctx = torch.randn(8, 3, 8, generator=data)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(c["steps"]):
        gen.manual_seed(1)  # the same noise draw every step: a deterministic objective
        loss = engine(x0, ctx)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    total = sum(p.numel() for p in den.parameters())
    # ZeRO-1/2 keep this rank's slice of the fp32 master weights here; ZeRO-3 partitions elsewhere.
    groups = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    partitioned = groups[0].numel() if groups else -1
    with barrier_report_dir() as d:
        engine.save_checkpoint(d, tag="t")
        report({"first": losses[0], "last": losses[-1], "rank": rank, "world": world,
                "partition": partitioned, "total": total, "loss_dtype": str(loss.dtype),
                "weight_dtypes": sorted({str(p.dtype) for p in den.parameters()}),
                "out_dtypes": sorted(out_dtypes)}, d)


@pytest.mark.parametrize("stage", [
    0, pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_zero_two_cpu_ranks(ray_local, tmp_path, stage):
    ds = deepspeed_config(batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=1, grad_clip=1.0,
                          zero_stage=stage, precision="fp32", on_gpu=False)
    import os
    result = fit(_zero_loop, {"unet": UNET, "ds": ds, "steps": 12}, num_workers=2, use_gpu=False,
                 storage_path=str(tmp_path), name="zero2",
                 env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]})
    m = result.metrics
    assert m["world"] == 2
    assert m["last"] < 0.8 * m["first"]
    assert m["weight_dtypes"] == ["torch.float32"] and m["out_dtypes"] == ["torch.float32"]   # fp32: no autocast
    if stage in (1, 2):   # the fp32 master weights / optimizer state are sharded: about half each
        assert 0 < m["partition"] <= m["total"] // 2 + 64
    with result.checkpoint.as_directory() as d:
        files = sorted(os.listdir(os.path.join(d, "t")))
        # One optimizer partition per rank; stage 0 keeps the whole optimizer with the module, and
        # consolidating it used to fail inside zero_to_fp32 (which reads only ZeRO shards).
        assert sum("optim_states" in f for f in files) == (2 if stage else 0), files
        state = consolidate_zero_checkpoint(d, "t")
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    from models.unet import UNet, UNetConfig
    unet = UNet(UNetConfig.from_dict(UNET))
    sd = {k.removeprefix("d.net."): v for k, v in state.items() if k.startswith("d.net.")}
    unet.load_state_dict(sd, strict=True)
    assert any(not torch.all(v == 0) for k, v in sd.items() if "out" in k)  # trained past zero-init


def test_bf16_is_torch_autocast_with_fp32_weights():
    """precision bf16 asks DeepSpeed for torch autocast (fp32 weights stepped directly, bf16 convs
    and matmuls), not its bf16 mode (a bf16 module with an fp32 master copy); fp32 asks for neither."""
    kw = dict(batch_size=4, lr=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0, zero_stage=2, on_gpu=False)
    bf16 = deepspeed_config(precision="bf16", **kw)
    # lower_precision_safe_modules [] : gradients reduced in fp32 (exact ZeRO-3 resume, tests/test_resume.py)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in bf16
    fp32 = deepspeed_config(precision="fp32", **kw)
    assert "torch_autocast" not in fp32 and "bf16" not in fp32


def test_cpu_zero_skips_the_contiguous_gradient_buffer():
    """On the CPU the per-parameter copies into a contiguous gradient buffer cost ~20% of a small
    ZeRO-2 step (BENCHMARKS.md); on GPU DeepSpeed's default (on) is kept."""
    kw = dict(batch_size=4, lr=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0, precision="fp32")
    for stage in (1, 2, 3):
        assert deepspeed_config(zero_stage=stage, on_gpu=False, **kw)["zero_optimization"]["contiguous_gradients"] is False
        assert "contiguous_gradients" not in deepspeed_config(zero_stage=stage, on_gpu=True, **kw)["zero_optimization"]
    assert deepspeed_config(zero_stage=0, on_gpu=False, **kw)["zero_optimization"] == {"stage": 0}


def test_zero2_bf16_autocast_keeps_fp32_weights(ray_local, tmp_path):
    ds = deepspeed_config(batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=1, grad_clip=1.0,
                          zero_stage=2, precision="bf16", on_gpu=False)
    import os
    m = fit(_zero_loop, {"unet": UNET, "ds": ds, "steps": 12}, num_workers=2, use_gpu=False,
            storage_path=str(tmp_path), name="z2autocast",
            env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}).metrics
    assert m["world"] == 2
    assert m["weight_dtypes"] == ["torch.float32"]     # the module's weights stay fp32 ...
    assert m["out_dtypes"] == ["torch.bfloat16"]       # ... its convs compute in bf16 ...
    assert m["loss_dtype"] == "torch.float32"          # ... and the loss is fp32
    assert m["last"] < 0.8 * m["first"]                # and it learns


def test_prebuilt_op_loads_without_a_compiler(tmp_path, monkeypatch):
    """infra/Dockerfile builds the op in its build stage and runs where there is no compiler: a load
    with the same ninja and no c++ on PATH must find the op up to date, not try to build it."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    from cluster.prebuild import prebuild_cpu_ops
    target = os.environ["TORCH_EXTENSIONS_DIR"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", target)   # prebuild points it at its target; undone after
    prebuild_cpu_ops(target)   # a no-op where built (setup.sh), with this PATH's ninja
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").symlink_to(shutil.which("ninja"))
    path = f"{bin_dir}:{Path(sys.executable).parent}"
    assert shutil.which("c++", path=path) is None and shutil.which("g++", path=path) is None
    code = "from deepspeed.comm.torch import build_shm_op; print(build_shm_op().__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, "TORCH_EXTENSIONS_DIR": target})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(str(Path(target).resolve()))


def test_prebuild_compiles_the_op_deepspeeds_cpu_backend_loads(tmp_path, monkeypatch):
    """cluster.prebuild builds, into the directory the workers use, the op every DeepSpeed process
    group on the CPU loads at start."""
    import os
    from pathlib import Path
    from cluster.prebuild import main, prebuild_cpu_ops
    target = os.environ["TORCH_EXTENSIONS_DIR"]   # the tests' cache (conftest), built by scripts/setup.sh
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", target)   # prebuild points it at its target; undone after
    assert prebuild_cpu_ops(target) == ["deepspeed_shm_comm"]
    assert list((Path(target) / "deepspeed_shm_comm").glob("deepspeed_shm_comm*.so"))
    assert main([str(tmp_path), "extra"]) == 2
    # An option is never taken for a directory (`--help` once built the op into ./--help).
    cwd = os.getcwd()
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0 and main(["--bogus"]) == 2
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(cwd)


def test_default_op_cache_is_one_per_python_environment(tmp_path, monkeypatch):
    """torch writes the environment's include paths into an op's build.ninja, so two checkouts' venvs
    sharing the default cache rebuilt the shm op for each other (73 s of one benchmarked quickstart
    start-up): the default resolves to a subdirectory per sys.prefix, the same for prebuild and the
    workers; an explicit directory (the container image's) is used as given."""
    import os
    import sys
    from cluster.prebuild import DEFAULT_DIR, resolve_dir
    from cluster.runtime import worker_env
    from pipelines.config import ClusterConfig
    mine = resolve_dir()
    base = os.path.expanduser(DEFAULT_DIR)
    assert os.path.dirname(mine) == base and os.path.isabs(mine)
    assert resolve_dir(ClusterConfig().torch_extensions_dir) == mine
    assert resolve_dir(base + "/") == mine                        # the same directory spelt otherwise
    assert worker_env(ClusterConfig().torch_extensions_dir)["TORCH_EXTENSIONS_DIR"] == mine
    assert resolve_dir(mine) == mine                              # resolving twice changes nothing
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other = resolve_dir()
    assert other != mine and os.path.dirname(other) == base
    assert resolve_dir("/opt/ldmflow/torch_extensions") == "/opt/ldmflow/torch_extensions"
    assert worker_env(str(tmp_path / "x"))["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "x")
