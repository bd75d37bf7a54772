import json
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, PipelineConfig, config_hash, load_config, to_dict

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"


def test_quickstart_loads_typed():
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, PipelineConfig)
    assert isinstance(cfg.diffusion.unet.channels, int)
    assert cfg.diffusion.unet.channel_mult == (1, 2)       # YAML list -> the constructor's tuple
    assert cfg.autoencoder.model.resolution == cfg.data.resolution == 32  # filled from data
    assert cfg.diffusion.unet.in_channels == cfg.autoencoder.model.z_channels
    assert Path(cfg.sample.prompts).is_file()              # resolved against the YAML's directory
    assert cfg.diffusion.unet.context_dim == cfg.cache.text_encoder.width


@pytest.mark.parametrize("override, message", [
    ("diffusion.unet.channels=wide", "diffusion.unet.channels: expected int, got str 'wide'"),
    ("diffusion.unet.channels=2.5", "diffusion.unet.channels: expected int"),
    ("diffusion.unet.chanels=64", "diffusion.unet.chanels: unknown key"),
    ("diffusion.zero_stage=4", "diffusion.zero_stage: expected 0, 1, 2 or 3"),
    ("data.source=mnist", "data.source: expected one of 'shapes', 'emoji', 'shards'"),
    ("sample.guidance_scale=true", "sample.guidance_scale: expected float, got bool"),
    ("nonsense.key=1", "nonsense: unknown key"),
    ("autoencoder.model.ch_mult=[1, x]", "autoencoder.model.ch_mult[1]: expected int"),
    ("autoencoder.model.resolution=64", "autoencoder.model.resolution: expected data.resolution"),
    ("diffusion.unet.in_channels=3", "diffusion.unet.in_channels: expected autoencoder.model.z_channels"),
    ("data.source=shards", "data.train_urls: required"),
    ("cache.text_encoder.model=NoSuchModel", "cache.text_encoder.model"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    assert message in str(e.value)


def test_diffusion_compile_is_refused_under_zero3():
    assert load_config(QUICKSTART, ["diffusion.compile=true"]).diffusion.compile
    with pytest.raises(ConfigError, match=r"diffusion\.compile: supported with zero_stage 0, 1 or 2, got zero_stage 3"):
        load_config(QUICKSTART, ["diffusion.compile=true", "diffusion.zero_stage=3"])


def test_overrides_parse_yaml_values():
    cfg = load_config(QUICKSTART, ["diffusion.lr=1e-4", "autoencoder.model.ch_mult=[1, 2, 2, 2]",
                                   "tracking.uri=null", "diffusion.precision=bf16"])
    assert cfg.diffusion.lr == 1e-4 and isinstance(cfg.diffusion.lr, float)
    assert cfg.autoencoder.model.ch_mult == (1, 2, 2, 2)
    assert cfg.autoencoder.model.downsample_factor == 8
    assert cfg.tracking.uri is None
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(QUICKSTART, ["diffusion.lr"])


def test_config_round_trip_and_hash():
    cfg = load_config(QUICKSTART)
    again = load_config(data=json.loads(json.dumps(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(QUICKSTART, ["diffusion.lr=1e-4"])) != config_hash(cfg)


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("data:\n")
    with pytest.raises(ConfigError, match="data: empty section"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(QUICKSTART), f"output_dir={out}", "diffusion.unet.channels=wide"])
    assert code == 2
    assert "diffusion.unet.channels: expected int" in capsys.readouterr().err
    assert not out.exists()   # nothing was started or written


def test_cli_validate_prints_resolved(capsys):
    assert main(["validate", "quickstart", "diffusion.max_steps=7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["diffusion"]["max_steps"] == 7
