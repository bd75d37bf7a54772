"""Bad input: a clear message naming what is wrong, exit status 2, nothing already written touched."""
import tarfile
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.data import check_shard
from pipelines.sample import PromptsError, read_prompts
from pipelines.shards import ShardError, encode_png, expand_urls, iter_samples, write_shard


def _run(capsys, *args):
    code = main(["run", "quickstart", *args])
    return code, capsys.readouterr().err


def test_empty_prompts_file_stops_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n  \n")
    out = tmp_path / "run"
    code, err = _run(capsys, f"output_dir={out}", f"sample.prompts={prompts}")
    assert code == 2 and "holds no prompts" in err and str(prompts) in err
    assert not out.exists()


def test_prompts_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(PromptsError, match=r"p.jsonl:2: expected an object with a string"):
        read_prompts(str(p), 1, 0)
    p.write_text('{"prompt": "ok", "seed": "x"}\n')
    with pytest.raises(PromptsError, match=r":1: \"seed\" must be an integer"):
        read_prompts(str(p), 1, 0)
    with pytest.raises(PromptsError, match="file not found"):
        read_prompts(str(tmp_path / "none.txt"), 1, 0)
    p.write_text('{"prompt": "a", "seed": 5}\n{"prompt": "b"}\n')
    rows = read_prompts(str(p), 2, 100)
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == [
        (0, "a", 5), (1, "a", 6), (2, "b", 102), (3, "b", 103)]


def test_missing_shard(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, f"output_dir={out}", "data.source=shards",
                     f"data.train_urls={tmp_path}/shards/{{000..003}}.tar")
    assert code == 2 and "000.tar: shard not found" in err
    assert not out.exists()


def _good_shard(path, n=3):
    from PIL import Image
    write_shard(path, [{"__key__": f"k{i}", "png": encode_png(Image.new("RGB", (8, 8))), "txt": "x"}
                       for i in range(n)])


def test_corrupt_and_incomplete_shards_are_named(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="bad.tar: corrupt shard"):
        check_shard(str(bad))
    good = tmp_path / "good.tar"
    _good_shard(good)
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(ShardError, match="trunc.tar"):
        check_shard(str(truncated))
    nocap = tmp_path / "nocap.tar"
    with tarfile.open(nocap, "w") as tf:
        tf.add(good, arcname="k0.png")
    with pytest.raises(ShardError, match="nocap.tar: sample k0 has no .txt caption"):
        check_shard(str(nocap))
    assert check_shard(str(good))["count"] == 3


def test_shard_url_forms(tmp_path):
    for i in range(3):
        _good_shard(tmp_path / f"s-{i:03d}.tar", n=2)
    assert len(expand_urls(str(tmp_path))) == 3                      # a directory
    assert len(expand_urls(f"{tmp_path}/s-{{000..001}}.tar")) == 2   # a brace pattern
    assert len(expand_urls(f"file://{tmp_path}/s-000.tar")) == 1
    mem = "memory://ldmflow-test/s-000.tar"                          # an fsspec URL
    import fsspec
    with fsspec.open(mem, "wb") as f:
        f.write((tmp_path / "s-000.tar").read_bytes())
    urls = expand_urls(mem)
    assert [s["__key__"] for s in iter_samples(urls)] == ["k0", "k1"]
    with pytest.raises(ShardError, match="directory holds no .tar shards"):
        (tmp_path / "empty").mkdir()
        expand_urls(str(tmp_path / "empty"))


def test_missing_font_says_how_to_install(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, f"output_dir={out}", "data.source=emoji",
                     f"data.font_path={tmp_path}/NoFont.ttf")
    assert code == 2 and "fonts-noto-color-emoji" in err and "NoFont.ttf" in err
    assert not out.exists()


def test_foreign_output_dir_is_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    precious = out / "results.csv"
    precious.write_text("do not touch")
    code, err = _run(capsys, f"output_dir={out}")
    assert code == 2 and "not an ldmflow run directory" in err
    assert precious.read_text() == "do not touch"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_config_against_its_checkpoint_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """A stage's resume check (cluster.train.checked_resume_meta) raises ResumeMismatchError on
    the driver before any worker starts: the CLI prints it and exits 2, no traceback."""
    import pipelines.run
    from cluster.train import ResumeMismatchError

    def refuse(*a, **k):
        raise ResumeMismatchError("diffusion.max_steps: 4 is below step 5 of this training config's checkpoint")
    monkeypatch.setattr(pipelines.run, "run_pipeline", refuse)
    code, err = _run(capsys, f"output_dir={tmp_path / 'run'}")
    assert code == 2 and err.startswith("ldmflow: error: diffusion.max_steps: 4 is below step 5")


def test_context_dim_and_sampler_steps_checked_before_any_work():
    from pipelines.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"diffusion.unet.context_dim: expected the text encoder's width \(256"):
        load_config(data={"cache": {"text_encoder": {"width": 256, "heads": 4}},
                          "diffusion": {"unet": {"context_dim": 128}}})
    with pytest.raises(ConfigError, match=r"diffusion.unet.context_dim: expected the text encoder's width \(512"):
        load_config(data={"diffusion": {"unet": {"context_dim": 64}}})   # ViT-B-32's text width
    with pytest.raises(ConfigError, match=r"sample.steps: at most diffusion.schedule.num_timesteps \(100\)"):
        load_config(data={"diffusion": {"schedule": {"num_timesteps": 100}}, "sample": {"steps": 200}})
