"""precision "auto": bf16 only where the device computes it natively (models/precision.py)."""
import pytest
import torch

import models.precision as precision_module
from models.precision import native_bf16, resolve_precision
from pipelines.config import ConfigError, load_config
from tests.test_budget import QUICKSTART


def test_native_bf16_reads_the_cpu_flags():
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16("cpu") == flags
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_hardware_and_explicit_choices_stay(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match=r"^precision: expected one of fp32, bf16, auto, got 'half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(ConfigError, match=r"^autoencoder.precision"):
        load_config(QUICKSTART, ["autoencoder.precision=half"])
    cfg = load_config(QUICKSTART, ["diffusion.precision=auto", "clip.precision=auto"])
    assert (cfg.autoencoder.precision, cfg.diffusion.precision, cfg.clip.precision) == ("auto", "auto", "auto")
