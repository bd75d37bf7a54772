"""fp32 vs bf16 autocast training steps on this machine, and what `precision: auto` picks.

    python benchmarks/precision.py [--quick] [--json PATH]

The quickstart's autoencoder (batch 16 at 32 px, L1 loss, Adam) and U-Net (batch 32 of 4x8x8 latents,
16 text tokens of width 256, Adam) at 1 thread, random weights (a step's cost does not depend on
them). Each precision runs a block of steps in turn, repeated; the figure is the median step time.
bf16 autocast pays on CPUs with AVX-512-bf16 or AMX and on bf16 GPUs; elsewhere every bf16 op is
emulated. Figure: the step time of the faster precision / the step time of auto's pick (1.00x when
auto picks the faster one on every model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "pipelines" / "configs" / "quickstart.yaml"
TARGET = 0.95


def _models(quick: bool):
    import torch
    from models.autoencoder import AutoencoderKL
    from models.unet import UNet
    from pipelines.config import load_config
    over = (["autoencoder.model.ch=8", "diffusion.unet.channels=16", "diffusion.unet.num_heads=2"] if quick else [])
    cfg = load_config(str(QUICKSTART), over)
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg.autoencoder.model)
    unet = UNet(cfg.diffusion.unet)
    res, ctx_dim = cfg.autoencoder.model.resolution, cfg.diffusion.unet.context_dim
    x = torch.randn(cfg.autoencoder.batch_size, 3, res, res)
    z = torch.randn(cfg.diffusion.batch_size, 4, res // 4, res // 4)
    t = torch.randint(0, 1000, (z.shape[0],))
    ctx = torch.randn(z.shape[0], cfg.cache.text_encoder.context_length, ctx_dim)
    return {"autoencoder": (ae, lambda m: (m(x)[0].float() - x).abs().mean()),
            "U-Net": (unet, lambda m: m(z, t, ctx).float().pow(2).mean())}, cfg


def _step(model, opt, loss_of, bf16: bool) -> None:
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(quick: bool = False) -> dict:
    import torch
    from models.precision import native_bf16, resolve_precision
    torch.set_num_threads(1)
    models, _ = _models(quick)
    steps, reps = (1, 2) if quick else (4, 3)
    auto = resolve_precision("auto", "cpu")
    rows, ratios, raw = [], [], {}
    for name, (model, loss_of) in models.items():
        from models.optim import adam   # the stages' optimizer
        opt = adam(model.parameters(), lr=1e-4)
        times = {"fp32": [], "bf16": []}
        for p in times:   # warm-up: first-call costs, allocator
            _step(model, opt, loss_of, p == "bf16")
        for _ in range(reps):
            for p in times:
                t0 = time.perf_counter()
                for _ in range(steps):
                    _step(model, opt, loss_of, p == "bf16")
                times[p].append((time.perf_counter() - t0) / steps)
        med = {p: statistics.median(v) for p, v in times.items()}
        best = min(med, key=med.get)
        ratios.append(med[best] / med[auto])
        raw[name] = times
        rows.append([name, f"{med['fp32'] * 1e3:,.0f}", f"{med['bf16'] * 1e3:,.0f}",
                     f"{med['fp32'] / med['bf16']:.2f}x", best, auto])
    return {
        "benchmark": "precision",
        "title": "Training precision: fp32 vs bf16 autocast, and auto's pick",
        "command": "python benchmarks/precision.py" + (" --quick" if quick else ""),
        "setup": (f"{'smoke' if quick else 'quickstart'} sizes, 1 thread, {reps} x {steps} steps each, interleaved, "
                  f"median; this CPU computes bf16 natively (AVX-512-bf16 or AMX): {native_bf16('cpu')}"),
        "table": {"columns": ["model", "fp32 ms/step", "bf16 autocast ms/step", "bf16 speed-up", "faster", "auto picks"],
                  "rows": rows},
        "figures": [{"name": "faster precision's step time / auto's pick's", "value": min(ratios), "unit": "x",
                     "baseline": "the faster of fp32 and bf16, worst model", "op": ">=", "target": TARGET}],
        "raw": raw,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes (tests)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    res = run(a.quick)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    for r in res["table"]["rows"]:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
