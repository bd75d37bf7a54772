"""Diffusion training step: eager vs `diffusion.compile` (torch.compile of the U-Net), side by side.

    python benchmarks/training_compile.py [--quick] [--json PATH]

The quickstart's U-Net and loss as one diffusion worker runs them (pipelines/configs/quickstart.yaml:
batch 32 of 4x8x8 latents, 16 text tokens of width 256, the objective's loss with its own noise and
timesteps, fused AdamW, grad clipping, the config's precision), at 1 thread (a worker's share of
the 2-core machine), random weights. Two copies start from the same weights: one eager, one with
its U-Net compiled in place as the worker does (`denoiser.net.compile()`). The first compiled step
runs in a fresh inductor cache directory (cold, as on a new machine) and its time less an eager
step is the compile cost. Then blocks of steps alternate (eager, compiled, eager, ...), and each
side's median step time is reported. The two first steps draw the same noise, and their losses
are compared (same math, other kernels). Figure: eager step time / compiled step time; no target
(issue 8 asks that torch.compile be an option that is measured), and how many steps repay the
compile.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.latent_cache import train_step  # noqa: E402  (the one step every benchmark times)

QUICKSTART = ROOT / "pipelines" / "configs" / "quickstart.yaml"


class Worker:
    """One worker's training step without DeepSpeed (latent_cache.train_step): loss, backward,
    clipping, fused AdamW."""

    def __init__(self, denoiser, cfg, bf16: bool):
        import torch
        from models.optim import adam
        self.denoiser, self.cfg, self.bf16 = denoiser, cfg, bf16
        self.opt = adam(denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=True)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, x0, ctx, mask) -> float:
        return train_step(self.denoiser, self.opt, x0, ctx, mask, generator=self.gen, bf16=self.bf16,
                          grad_clip=self.cfg.grad_clip)


def repay_steps(compile_s: float, eager_s: float, compiled_s: float) -> float | None:
    """Steps after which the compiled run has caught up with the eager one (None: it never does)."""
    saved = eager_s - compiled_s
    return compile_s / saved if saved > 0 else None


def run(quick: bool = False) -> dict:
    import torch
    from models.denoiser import build_denoiser
    from models.precision import resolve_precision
    from models.unet import UNet
    from pipelines.config import load_config
    torch.set_num_threads(1)
    over = (["diffusion.unet.channels=16", "diffusion.unet.num_heads=2", "diffusion.batch_size=4"] if quick else [])
    cfg = load_config(str(QUICKSTART), over)
    d = cfg.diffusion
    bf16 = resolve_precision(d.precision, "cpu") == "bf16"
    torch.manual_seed(0)
    base = build_denoiser(UNet(d.unet), d.schedule, d.objective).train()
    eager = Worker(base, d, bf16)
    compiled_denoiser = copy.deepcopy(base)
    compiled_denoiser.net.compile()               # what diffusion_worker does with compile: true
    compiled = Worker(compiled_denoiser, d, bf16)
    res = cfg.data.resolution // 4
    x0 = torch.randn(d.batch_size, d.unet.in_channels, res, res)
    ctx = torch.randn(d.batch_size, cfg.cache.text_encoder.context_length, d.unet.context_dim)
    mask = torch.ones(d.batch_size, cfg.cache.text_encoder.context_length, dtype=torch.bool)

    inductor_dir = tempfile.mkdtemp(prefix="ldmflow-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir   # cold: what a new machine pays
    t = time.perf_counter()
    loss_eager = eager.step(x0, ctx, mask)
    eager_first = time.perf_counter() - t
    t = time.perf_counter()
    loss_compiled = compiled.step(x0, ctx, mask)      # same weights, same generator state: same draw
    compile_s = max(0.0, time.perf_counter() - t - eager_first)

    steps, reps = (2, 2) if quick else (10, 5)
    times = {"eager": [], "compiled": []}
    for _ in range(2):                                # warm-up: allocator, first-call costs
        eager.step(x0, ctx, mask)
        compiled.step(x0, ctx, mask)
    for _ in range(reps):
        for name, w in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            for _ in range(steps):
                w.step(x0, ctx, mask)
            times[name].append((time.perf_counter() - t) / steps)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    repay = repay_steps(compile_s, e, c)
    prec = "bf16 autocast" if bf16 else "fp32"
    u = d.unet
    rows = [["eager", f"{e * 1e3:.1f}", f"{d.batch_size / e:.0f}", "1.00x", "-"],
            ["torch.compile (diffusion.compile)", f"{c * 1e3:.1f}", f"{d.batch_size / c:.0f}", f"{e / c:.2f}x",
             f"{compile_s:.0f}"]]
    note = (f"first-step losses: eager {loss_eager:.6f}, compiled {loss_compiled:.6f} (same draw); "
            + (f"the compile is repaid after {repay:,.0f} steps at these times "
               f"(the quickstart's diffusion stage takes {d.max_steps} per worker)" if repay is not None
               else "the compiled step is not faster here, so the compile is never repaid"))
    return {
        "benchmark": "training_compile",
        "title": "Diffusion training step: eager vs torch.compile",
        "command": "python benchmarks/training_compile.py" + (" --quick" if quick else ""),
        "setup": (f"{'smoke' if quick else 'quickstart'} U-Net ({u.channels} x{list(u.channel_mult)}), batch "
                  f"{d.batch_size} of {u.in_channels}x{res}x{res}, {prec}, 1 thread, fused AdamW; compile timed "
                  f"cold (fresh inductor cache); {reps} x {steps} steps each, interleaved, median"),
        "table": {"columns": ["variant", "ms/step", "img/s", "vs eager", "compile s (cold)"], "rows": rows},
        "note": note,
        "figures": [{"name": "training step, eager / compiled", "value": e / c, "unit": "x",
                     "baseline": "eager", "op": ">=", "target": None}],
        "raw": {"times": times, "compile_s": compile_s, "losses": [loss_eager, loss_compiled]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes (tests)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    res = run(a.quick)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(res["setup"])
    for r in res["table"]["rows"]:
        print("| " + " | ".join(r) + " |")
    print(res["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
