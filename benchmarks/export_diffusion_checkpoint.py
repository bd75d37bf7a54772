"""Export a diffusion training checkpoint (mid-run or final) as a model directory a sampler loads.

    python benchmarks/export_diffusion_checkpoint.py RUN_DIR OUT_DIR [--checkpoint CKPT_DIR]

RUN_DIR is a pipeline output directory; CKPT_DIR defaults to the newest complete checkpoint of its
diffusion stage under RUN_DIR/ray_results. OUT_DIR gets unet/ (the consolidated ZeRO weights),
unet_ema/ (the EMA shadow, when the run keeps one), schedule.json, objective.json and step.json:
the layout of the diffusion stage's own model directory, so benchmarks/text_alignment.py
--diffusion-dir can score a model at any checkpoint without waiting for the run to end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from cluster.train import consolidate_zero_checkpoint
    from models.checkpoint import save_module
    from models.unet import UNet, UNetConfig
    from pipelines.train_diffusion import CKPT_TAG, META, STATE_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--checkpoint")
    args = ap.parse_args()
    run = Path(args.run_dir)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        found = sorted((p.parent for p in (run / "ray_results").glob("diffusion*/checkpoint_*/" + META)),
                       key=lambda d: json.loads((d / META).read_text())["step"])
        if not found:
            sys.exit(f"{run}/ray_results: no complete diffusion checkpoint (with {META})")
        ckpt = found[-1]
    meta = json.loads((ckpt / META).read_text())
    cfg = meta["config"]
    unet_cfg = UNetConfig.from_dict(cfg["unet"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = consolidate_zero_checkpoint(str(ckpt), CKPT_TAG)
    prefix = "denoiser.net."
    unet = UNet(unet_cfg)
    unet.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    save_module(unet, unet_cfg.to_dict(), out / "unet", extra={"steps": meta["step"]})
    ema_file = ckpt / STATE_DIR / "ema.pt"
    if ema_file.is_file():   # ZeRO 0-2: one full shadow
        ema = torch.load(ema_file, weights_only=True)
        shadow = UNet(unet_cfg)
        shadow.load_state_dict({**ema["shadow"], **ema["buffers"]}, strict=True)
        save_module(shadow, unet_cfg.to_dict(), out / "unet_ema", extra={"steps": meta["step"]})
    (out / "schedule.json").write_text(json.dumps(cfg["schedule"], indent=2))
    (out / "objective.json").write_text(json.dumps(cfg.get("objective", {}), indent=2))
    (out / "step.json").write_text(json.dumps({"step": meta["step"], "checkpoint": str(ckpt)}, indent=2))
    print(f"{out}: step {meta['step']} from {ckpt}")


if __name__ == "__main__":
    main()
