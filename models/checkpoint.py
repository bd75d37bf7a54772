"""A model checkpoint is a directory: `model.safetensors` + `config.json`.

`config.json` holds the model's config dict (enough to rebuild the same net, as
nanoGPT's `model_args`) and, under the key "extra", free-form JSON metadata the
caller wants kept beside the weights (step, latent scale, data fingerprint...).
Model-specific wrappers (`autoencoder.save_pretrained`, ...) sit on top of
`save_module` / `load_state`.

Also here: the dataclass <-> JSON dict helpers every model config uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "EXTRA_KEY",
    "save_module",
    "load_state",
    "config_to_dict",
    "config_from_dict",
    "check_int",
    "check_int_tuple",
    "check_dropout",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXTRA_KEY = "extra"

C = TypeVar("C")


def _write_atomic(path: Path, write) -> None:
    # Write beside the target, then rename: a crash mid-save leaves the previous
    # file (or none), never a truncated one that a resume would load.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_module(
    module: nn.Module,
    config_dict: dict[str, Any],
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save `module.state_dict()` and `config_dict` (+ `extra`) into `directory`.

    Returns the directory. Tensors are stored as they are (dtype kept), moved to
    CPU. Tied (storage-sharing) parameters are refused by safetensors; no model
    here ties weights.
    """
    if EXTRA_KEY in config_dict:
        raise ValueError(f"config_dict: the key {EXTRA_KEY!r} is reserved for extra metadata")
    # Serialise first so that non-JSON metadata fails before anything is written.
    config_text = json.dumps({**config_dict, EXTRA_KEY: dict(extra or {})}, indent=2, sort_keys=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    # config.json last: its presence says the weights beside it are complete.
    _write_atomic(directory / CONFIG_NAME, lambda p: p.write_text(config_text + "\n"))
    return directory


def load_state(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a directory written by `save_module`: (config_dict, state_dict, extra)."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name}; not a checkpoint written by save_module")
    config_dict = json.loads((directory / CONFIG_NAME).read_text())
    extra = config_dict.pop(EXTRA_KEY, {})
    state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    return config_dict, state, extra


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Build dataclass `cls` from a dict as written by `config_to_dict`.

    Unknown keys are an error (a typo would otherwise silently fall back to a
    default); missing keys take the defaults; lists for tuple fields are turned
    back into tuples by the config's own __post_init__.
    """
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    return cls(**d)


# Field validators for config __post_init__: short errors that name the field.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not to us


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return value


def check_int_tuple(name: str, value: Any, *, minimum: int = 1, nonempty: bool = True) -> tuple[int, ...]:
    """Validate a sequence of ints and return it as a tuple (lists come from JSON)."""
    ok = isinstance(value, (tuple, list)) and all(_is_int(v) and v >= minimum for v in value)
    if not ok or (nonempty and not value):
        kind = {0: "non-negative ints", 1: "positive ints"}.get(minimum, f"ints >= {minimum}")
        raise ValueError(f"{name}: expected a {'non-empty ' if nonempty else ''}list of {kind}, got {value!r}")
    return tuple(value)


def check_dropout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)
