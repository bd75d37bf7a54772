"""Autoencoder families by name: the pipeline picks "kl" or "vq" from its config.

`AUTOENCODER_FAMILIES[name]` bundles what a stage needs without knowing the family: how to build
the model from a config dict, and how to save / load it (a directory with config.json +
model.safetensors, see models/checkpoint.py). `load_autoencoder` reads a saved directory of
either family; the family is recognised from the config's keys (a VQ config nests
"autoencoder" and "quantizer"), so checkpoints written before this registry still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models import autoencoder as _kl
from models import autoencoder_vq as _vq
from models.checkpoint import CONFIG_NAME, EXTRA_KEY

__all__ = ["AutoencoderFamily", "AUTOENCODER_FAMILIES", "build_autoencoder", "load_autoencoder", "family_of"]


@dataclass(frozen=True)
class AutoencoderFamily:
    name: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    model: Callable[[Any], nn.Module]  # config -> model
    save_pretrained: Callable[..., Any]  # (model, directory, extra=None) -> directory
    load_pretrained: Callable[..., tuple[nn.Module, dict[str, Any]]]  # (directory, map_location)


AUTOENCODER_FAMILIES: dict[str, AutoencoderFamily] = {
    "kl": AutoencoderFamily("kl", _kl.AutoencoderConfig.from_dict, _kl.AutoencoderKL,
                            _kl.save_pretrained, _kl.load_pretrained),
    "vq": AutoencoderFamily("vq", _vq.AutoencoderVQConfig.from_dict, _vq.AutoencoderVQ,
                            _vq.save_pretrained, _vq.load_pretrained),
}


def _family(name: str) -> AutoencoderFamily:
    if name not in AUTOENCODER_FAMILIES:
        raise ValueError(f"family: expected one of {sorted(AUTOENCODER_FAMILIES)}, got {name!r}")
    return AUTOENCODER_FAMILIES[name]


def build_autoencoder(family: str, config: dict[str, Any]) -> nn.Module:
    f = _family(family)
    return f.model(f.config_from_dict(config))


def family_of(config: dict[str, Any]) -> str:
    """"vq" for a nested VQ config dict, "kl" otherwise."""
    return "vq" if "quantizer" in config else "kl"


def load_autoencoder(directory, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved autoencoder of any family: (model in eval mode, extra)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved autoencoder")
    config = json.loads(path.read_text())
    config.pop(EXTRA_KEY, None)
    return _family(family_of(config)).load_pretrained(directory, map_location)
