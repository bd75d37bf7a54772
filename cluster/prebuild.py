"""Compile, ahead of the first pipeline run, the DeepSpeed op a CPU training stage JIT-compiles.

    python -m cluster.prebuild [TORCH_EXTENSIONS_DIR]

DeepSpeed's CPU accelerator loads its shared-memory collective op (`deepspeed_shm_comm`) whenever
a DeepSpeed process group starts, used or not (only tensor-parallel inference uses it), and
JIT-compiles it on the first start: 36 s of the quickstart's diffusion stage on the 2-core machine,
with both ranks waiting. scripts/setup.sh runs this once so the first run finds it compiled.
The directory must be the one the pipeline's workers use (`cluster.torch_extensions_dir`,
DEFAULT_DIR unless a config says otherwise; `resolve_dir` maps both to the same path). infra/Dockerfile runs it in its build stage, since the
runtime image has no compiler: a later load with the same ninja finds the op up to date and needs
none. With CUDA there is nothing to build: DeepSpeed's GPU ops are compiled into the package
(infra/Dockerfile) or JIT-compiled by the stage that needs them.
"""
from __future__ import annotations

import hashlib
import os
import sys

__all__ = ["DEFAULT_DIR", "prebuild_cpu_ops", "resolve_dir"]

DEFAULT_DIR = "~/.cache/ldmflow/torch_extensions"   # ClusterConfig.torch_extensions_dir's default
CPU_OPS = ("ShareMemCommBuilder",)                  # what deepspeed.comm's CPU backend loads at start


def resolve_dir(torch_extensions_dir: str = DEFAULT_DIR) -> str:
    """The absolute TORCH_EXTENSIONS_DIR for `torch_extensions_dir`; DEFAULT_DIR gets one subdirectory
    per Python environment. torch's JIT build writes the environment's include paths into the op's
    build.ninja, so two virtual environments (two checkouts of the project) sharing one directory
    rebuild the op for each other, ~40 s on the next stage start each time. An explicit directory (the
    container image's) is one environment's by construction and is used as given."""
    path = os.path.abspath(os.path.expanduser(torch_extensions_dir))
    if path == os.path.abspath(os.path.expanduser(DEFAULT_DIR)):
        env = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
        path = os.path.join(path, f"env-{env}")
    return path


def prebuild_cpu_ops(torch_extensions_dir: str = DEFAULT_DIR) -> list[str]:
    """Build CPU_OPS into `resolve_dir(torch_extensions_dir)` (a no-op where already built); returns the
    names of the ops loaded, [] where DeepSpeed's accelerator is not the CPU one."""
    os.environ["TORCH_EXTENSIONS_DIR"] = resolve_dir(torch_extensions_dir)
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return []
    built = []
    for name in CPU_OPS:
        builder = acc.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m cluster.prebuild", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR, metavar="TORCH_EXTENSIONS_DIR",
                   help=f"where the workers look for JIT-compiled ops (default: {DEFAULT_DIR})")
    try:
        args = p.parse_args(argv)   # `--help` prints and exits 0; an unknown option exits 2
    except SystemExit as e:
        return int(e.code or 0)
    built = prebuild_cpu_ops(args.dir)
    print(f"DeepSpeed ops in {resolve_dir(args.dir)}: {', '.join(built) or 'none needed (not the CPU accelerator)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
