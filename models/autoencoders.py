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

__all__ = ["AutoencoderFamily", "AUTOENCODER_FAMILIES", "build_autoencoder", "load_autoencoder", "family_of",
           "load_init_weights", "WEIGHT_FIELDS"]


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


# The fields that decide the weights' names, shapes or function: init weights must match them.
# Not compared: resolution (the nets are fully convolutional; attention placement shows up as
# missing or unexpected keys), dropout, and the quantiser's training settings (beta, EMA, restarts).
WEIGHT_FIELDS = ("in_channels", "ch", "ch_mult", "num_res_blocks", "mid_attention", "z_channels",
                 "norm_num_groups", "double_z")
QUANTIZER_WEIGHT_FIELDS = ("codebook_size", "code_dim", "l2_normalize")


def _differences(have: dict[str, Any], want: dict[str, Any], fields, prefix: str = "") -> list[str]:
    norm = lambda v: list(v) if isinstance(v, tuple) else v   # noqa: E731 - JSON lists vs tuples
    return [f"{prefix}{k} (weights {norm(have.get(k))!r}, config {norm(want.get(k))!r})"
            for k in fields if norm(have.get(k)) != norm(want.get(k))]


def load_init_weights(net: nn.Module, family: str, directory) -> dict[str, Any]:
    """Load the weights saved in `directory` into `net` (a freshly built autoencoder of `family`),
    to start training from them: ours (config.json + model.safetensors, see save_pretrained) or
    diffusers' (`AutoencoderKL` / `VQModel.save_pretrained`: config.json with _class_name +
    diffusion_pytorch_model.safetensors). Returns {"format", "family", "scale_factor"}.

    Weights of another family or architecture raise ValueError naming every field that differs,
    then (for anything the fields do not show) the mismatching keys. The VQ quantiser's training
    state (EMA statistics, dead-code clock) starts fresh, as in a new run."""
    from models.interop.diffusers_autoencoder import read_diffusers_autoencoder, with_fresh_quantizer_state
    from models.checkpoint import WEIGHTS_NAME, config_to_dict, load_state

    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved autoencoder (ours or diffusers')")
    raw = json.loads(path.read_text())
    if "_class_name" in raw:
        fmt = f"diffusers {raw['_class_name']}"
        theirs_family, config, state, scale = read_diffusers_autoencoder(directory)
        have = config_to_dict(config.autoencoder if theirs_family == "vq" else config)
        have_q = config_to_dict(config.quantizer) if theirs_family == "vq" else {}
    else:
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
        fmt = "ldmflow"
        config_dict, state, extra = load_state(directory, "cpu")
        theirs_family = family_of(config_dict)
        have = config_dict.get("autoencoder", config_dict)
        have_q = config_dict.get("quantizer", {})
        scale = extra.get("scale_factor")
    if theirs_family != family:
        raise ValueError(f"init_weights: {directory} holds a {theirs_family.upper()} autoencoder ({fmt}); "
                         f"this stage trains family {family!r}")
    cfg = net.config
    want = config_to_dict(cfg.autoencoder if family == "vq" else cfg)
    diffs = _differences(have, want, WEIGHT_FIELDS, "model.")
    if family == "vq":
        diffs += _differences(have_q, config_to_dict(cfg.quantizer), QUANTIZER_WEIGHT_FIELDS, "quantizer.")
    if diffs:
        raise ValueError(f"init_weights: {directory} ({fmt}) is another architecture: {'; '.join(diffs)}")
    own = net.state_dict()
    if family == "vq":
        state = with_fresh_quantizer_state(state, own)
    try:
        _kl.load_state_checked(net, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()},
                               type(net).__name__)
    except ValueError as e:
        raise ValueError(f"init_weights: {directory} ({fmt}): {e}") from None
    return {"format": fmt, "family": family, "scale_factor": scale}
