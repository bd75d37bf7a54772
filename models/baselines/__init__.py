"""Baseline generative families under one contract (`base.Baseline`): a flat registry name -> class.

Each family lives in its own file; the registry imports them on first use so that a missing optional
piece of one family never breaks the others' import.
"""
from __future__ import annotations

from models.baselines.base import Baseline, BaselineConfig, NoLikelihood


def _ppca():
    from models.baselines.ppca import PPCA
    return PPCA


def _vae():
    from models.baselines.vae import VAE
    return VAE


def _vqvae():
    from models.baselines.vqvae import VQVAEPixelCNN
    return VQVAEPixelCNN


def _pixelcnn():
    from models.baselines.pixelcnn import PixelCNN
    return PixelCNN


def _imagegpt():
    from models.baselines.imagegpt import ImageGPT
    return ImageGPT


def _dcgan():
    from models.baselines.dcgan import DCGAN
    return DCGAN


def _stylegan():
    from models.baselines.stylegan import StyleGAN
    return StyleGAN


def _glow():
    from models.baselines.glow import Glow
    return Glow


def _ddpm():
    from models.baselines.ddpm import PixelDDPM
    return PixelDDPM


BASELINES = {"ppca": _ppca, "vae": _vae, "vqvae": _vqvae, "pixelcnn": _pixelcnn, "imagegpt": _imagegpt,
             "dcgan": _dcgan, "stylegan": _stylegan, "glow": _glow, "ddpm": _ddpm}


def baseline_class(family: str) -> type[Baseline]:
    if family not in BASELINES:
        raise ValueError(f"family: unknown baseline {family!r} (expected one of {sorted(BASELINES)})")
    return BASELINES[family]()


def build_baseline(family: str, config: dict) -> Baseline:
    """The family's model from a plain config dict (validated by its Config)."""
    cls = baseline_class(family)
    return cls(cls.Config.from_dict(config))


def save_baseline(model: Baseline, directory, extra: dict | None = None):
    """model.safetensors + config.json ({"family", "config"}; extra: lineage, metrics)."""
    from models.checkpoint import save_module
    return save_module(model, {"family": model.family, "config": model.config.to_dict()}, directory, extra=extra)


def load_baseline(directory, map_location="cpu") -> tuple[Baseline, dict]:
    """(model in eval mode, extra) from a directory written by save_baseline."""
    from models.checkpoint import load_state
    cfg, state, extra = load_state(directory, map_location)
    if "family" not in cfg:
        raise ValueError(f"{directory}: config.json has no 'family'; not a baseline model directory")
    model = build_baseline(cfg["family"], cfg["config"])
    model.load_state_dict(state)
    return model.eval(), extra


__all__ = ["BASELINES", "Baseline", "BaselineConfig", "NoLikelihood", "baseline_class", "build_baseline", "save_baseline",
           "load_baseline"]
