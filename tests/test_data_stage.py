"""`ldmflow data`: shards in the img2dataset layout, train/val split, the same bytes for the same seed."""
import json
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.datasets.shapes import verify
from pipelines.shards import decode_sample, iter_samples


def _data(tmp_path, name, *overrides):
    out = tmp_path / name
    args = ["data", f"output_dir={out}", "data.num_train=40", "data.num_val=10", "data.shard_size=16",
            "data.max_objects=2", "tracking.experiment=data-test", *overrides]
    assert main(args) == 0
    return out / "data"


def test_shapes_shards_layout_split_and_determinism(ray_local, tmp_path, capsys):
    a = _data(tmp_path, "a")
    assert sorted(p.name for p in (a / "train").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.name for p in (a / "val").glob("*.tar")] == ["val-000000.tar"]
    samples = [decode_sample(s) for s in iter_samples(sorted(str(p) for p in (a / "train").glob("*.tar")))]
    assert len(samples) == 40
    for s in samples:
        assert {"png", "txt", "json"} <= set(s)           # img2dataset layout
        assert s["json"]["split"] == "train" and s["png"].size == (32, 32)
        assert verify(s["png"], s["txt"])
    val_keys = {decode_sample(s)["__key__"] for s in iter_samples([str(a / "val" / "val-000000.tar")])}
    assert len(val_keys) == 10 and not val_keys & {s["__key__"] for s in samples}
    art = json.loads((a / "artifact.json").read_text())
    assert art["num_train"] == 40 and art["num_val"] == 10
    assert "dataset hash: " + art["dataset_hash"] in capsys.readouterr().out

    b = _data(tmp_path, "b")                                  # same seed: same bytes
    for p in sorted(a.rglob("*.tar")):
        assert p.read_bytes() == (b / p.relative_to(a)).read_bytes()
    assert json.loads((b / "artifact.json").read_text())["dataset_hash"] == art["dataset_hash"]
    c = _data(tmp_path, "c", "data.seed=1")                   # another seed: other data
    assert json.loads((c / "artifact.json").read_text())["dataset_hash"] != art["dataset_hash"]


def test_emoji_shards(ray_local, tmp_path):
    d = _data(tmp_path, "emoji", "data.source=emoji")
    samples = [decode_sample(s) for s in iter_samples(sorted(str(p) for p in (d / "train").glob("*.tar")))]
    assert len(samples) == 40
    assert all(s["txt"].startswith("an emoji of ") and s["json"]["codepoints"] for s in samples)


def test_existing_shards_as_source(ray_local, tmp_path):
    src = _data(tmp_path, "src")
    out = tmp_path / "reuse"
    assert main(["data", f"output_dir={out}", "data.source=shards",
                 f"data.train_urls={src}/train/train-{{000000..000002}}.tar",
                 f"data.val_urls={src}/val", "tracking.experiment=data-test"]) == 0
    art = json.loads((out / "data" / "artifact.json").read_text())
    assert art["num_train"] == 40 and art["num_val"] == 10
    # the content hash does not depend on where the shards live
    assert art["dataset_hash"] == json.loads((src / "artifact.json").read_text())["dataset_hash"]


def test_corrupt_shard_source_fails_with_its_name(ray_local, tmp_path, capsys):
    bad = tmp_path / "shards"
    bad.mkdir()
    (bad / "000.tar").write_bytes(b"\0garbage" * 64)
    code = main(["data", f"output_dir={tmp_path / 'out'}", "data.source=shards", f"data.train_urls={bad}",
                 "tracking.experiment=data-test"])
    assert code == 2
    assert "000.tar: corrupt shard" in capsys.readouterr().err
    assert (bad / "000.tar").read_bytes() == b"\0garbage" * 64
