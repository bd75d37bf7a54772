"""Tiny random-weight model bundles for the generate / pyfunc tests (seconds to build and sample)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEXT_WIDTH = 32


def tiny_bundle(directory: Path, *, steps: int = 3, seed: int = 0):
    """A complete bundle (pipelines.pyfunc.write_bundle layout) of random tiny networks: a 16 px KL
    autoencoder (f4, 4 latent channels), a 1-layer 32-wide text tower, a 16-channel U-Net."""
    from models.autoencoder import AutoencoderConfig, AutoencoderKL, save_pretrained
    from models.checkpoint import save_module
    from models.denoiser import ObjectiveConfig
    from models.schedules import ScheduleConfig
    from models.text import TextEncoder, TextEncoderConfig, save_text_encoder
    from models.unet import UNet, UNetConfig
    from pipelines.pyfunc import ModelBundle, SamplerSettings, write_bundle
    src = Path(directory) / "parts"
    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4))
    save_pretrained(ae, src / "autoencoder", extra={"scale_factor": 0.5})
    text = TextEncoder(TextEncoderConfig(layers=1, width=TEXT_WIDTH, heads=2, context_length=8), load_pretrained=False)
    save_text_encoder(text.eval(), src / "text_encoder")
    with torch.no_grad():
        states, mask = text.encode([""])
    np.savez(src / "null_text.npz", states=states[0].float().numpy(), mask=mask[0].numpy())
    ucfg = UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                      context_dim=TEXT_WIDTH)
    unet = UNet(ucfg)
    # The U-Net's output conv starts at zero (an identity-ish denoiser): give it weights so that
    # images depend on prompt and seed in a visible way.
    with torch.no_grad():
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    save_module(unet, ucfg.to_dict(), src / "diffusion" / "unet")
    (src / "diffusion" / "schedule.json").write_text(json.dumps(ScheduleConfig(num_timesteps=100).to_dict()))
    (src / "diffusion" / "objective.json").write_text(json.dumps(ObjectiveConfig().to_dict()))
    bundle = ModelBundle(diffusion_dir=str(src / "diffusion"), autoencoder_dir=str(src / "autoencoder"),
                         text_encoder_dir=str(src / "text_encoder"), null_text_file=str(src / "null_text.npz"),
                         scale_factor=0.5, settings=SamplerSettings(steps=steps, guidance_scale=3.0, seed=seed),
                         lineage={"diffusion_model_version": "1", "latent_cache_key": "tiny"})
    return write_bundle(bundle, Path(directory) / "bundle")
