"""`ldmflow lineage` / `ldmflow promote`: the chain from an image, run or model back to the dataset
hash and the code commit; registry aliases; bad targets exit 2.

Fast tests run on the stand-in pipeline of tests/test_stage_cache.py (real MLflow, real runner);
the slow test follows a sample image of the real tiny pipeline."""
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.provenance import LineageError, lineage_chain, promote
from pipelines.tracking import TAG
from tests.test_stage_cache import FakeStages, _cfg, _run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    FakeStages(mp)
    out = tmp_path_factory.mktemp("lineage") / "run"
    res = _run(_cfg(out))
    mp.undo()
    return out, res


def _kinds(nodes):
    return [n.kind for n in nodes]


def test_chain_from_a_sample_image_reaches_dataset_and_commit(fake_run):
    out, res = fake_run
    image = out / "samples" / "images" / "00000000.png"
    nodes = lineage_chain(res.tracker, str(image))
    # one code node per commit the runs were made at (other commits may land while a pipeline runs)
    assert _kinds(nodes)[:8] == ["image", "sample run", "diffusion model", "latent cache", "text encoder",
                                 "autoencoder", "dataset", "configs"] and set(_kinds(nodes)[8:]) == {"code"}
    img, sample, diff, cache, te, ae, data, configs, code = nodes[:9]
    assert img.details["seed"] == "7" and img.details["prompt"] == "a red circle"
    assert sample.run_id == res.samples.run_id
    assert diff.id == f"fake-unet/{res.diffusion.model_version}" and diff.run_id == res.diffusion.run_id
    assert "candidate" in diff.details["model"]
    assert cache.id == res.cache.key
    assert te.id == "te0"                                # no CLIP stage: built from the config
    assert ae.id == f"fake-autoencoder/{res.autoencoder.model_version}"
    assert data.id == res.data.dataset_hash and data.details["train shards"] == "1"
    assert set(configs.details) == {"sample", "diffusion", "cache", "autoencoder", "data"}
    data_commit = res.tracker.client.get_run(res.data.run_id).data.tags[TAG["code_commit"]]
    assert data_commit and data_commit in {n.id for n in nodes if n.kind == "code"}
    # every stage run also carries its cache key and the commit
    run = res.tracker.client.get_run(res.diffusion.run_id)
    assert run.data.tags[TAG["stage_key"]] == res.stages["diffusion"]["key"]
    assert run.data.tags[TAG["code_commit"]] in {n.id for n in nodes if n.kind == "code"}


def test_same_chain_from_id_run_and_model_reference(fake_run):
    out, res = fake_run
    by_image = lineage_chain(res.tracker, str(out / "samples" / "images" / "00000000.png"))
    by_id = lineage_chain(res.tracker, "0", out)          # the manifest's index
    assert [n.id for n in by_id[1:]] == [n.id for n in by_image[1:]]
    by_model = lineage_chain(res.tracker, "models:/fake-unet@candidate")
    assert _kinds(by_model)[0] == "diffusion model" and by_model[-3].id == res.data.dataset_hash
    by_version = lineage_chain(res.tracker, f"models:/fake-autoencoder/{res.autoencoder.model_version}")
    assert _kinds(by_version)[:4] == ["autoencoder", "dataset", "configs", "code"]
    by_pipeline = lineage_chain(res.tracker, res.pipeline_run_id)
    assert _kinds(by_pipeline)[:2] == ["pipeline run", "sample run"]


def test_unknown_targets(fake_run):
    out, res = fake_run
    for target, msg in (("models:/nope@production", "unknown registered model 'nope'"),
                        ("models:/fake-unet@gold", "has no alias 'gold'"),
                        ("models:/fake-unet/99", "has no version 99"),
                        ("0" * 32, "unknown target"),
                        ("img-123", "unknown target")):
        with pytest.raises(LineageError, match=msg):
            lineage_chain(res.tracker, target, out)
    stray = out.parent / "stray.png"
    Image.new("RGB", (4, 4)).save(stray)
    with pytest.raises(LineageError, match="no manifest describes this image"):
        lineage_chain(res.tracker, str(stray))


def test_cli_lineage_graph_and_exit_codes(fake_run, tmp_path, capsys):
    out, res = fake_run
    image = out / "samples" / "images" / "00000000.png"
    graph = tmp_path / "chain.png"
    assert main(["lineage", str(image), "--graph", str(graph)]) == 0   # run dir found from the image
    printed = capsys.readouterr().out
    assert res.data.dataset_hash in printed and res.tracker.client.get_run(res.data.run_id).data.tags[TAG["code_commit"]] in printed
    assert Image.open(graph).size[0] == 720
    logged = {f.path for f in res.tracker.client.list_artifacts(res.samples.run_id, "lineage")}
    assert logged == {"lineage/chain.png"}
    assert main(["lineage", "models:/fake-unet@gold", "--output-dir", str(out)]) == 2
    assert "has no alias 'gold'" in capsys.readouterr().err
    assert main(["lineage", "nothing-here", "--output-dir", str(tmp_path)]) == 2
    assert "holds no embedded MLflow" in capsys.readouterr().err


def test_promote_moves_aliases(fake_run, capsys):
    out, res = fake_run
    client = res.tracker.client
    v = res.diffusion.model_version
    assert promote(res.tracker, "fake-unet", "candidate", "production") == (v, None)
    assert str(client.get_model_version_by_alias("fake-unet", "production").version) == v
    assert main(["promote", "fake-unet", v, "--to", "staging", "--output-dir", str(out)]) == 0
    assert f"fake-unet: alias staging -> version {v}" in capsys.readouterr().out
    for args, msg in ((["nope", "1"], "unknown registered model 'nope'"),
                      (["fake-unet", "42"], "has no version 42"),
                      (["fake-unet", "gold"], "has no alias 'gold'")):
        assert main(["promote", *args, "--to", "production", "--output-dir", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert str(client.get_model_version_by_alias("fake-unet", "production").version) == v


@pytest.mark.slow
def test_real_pipeline_cache_and_lineage(ray_local, tmp_path, monkeypatch, capfd):
    """The tiny pipeline: a rerun recomputes nothing (Ray Train's fit is not even called), a changed
    diffusion setting reruns diffusion and samples only, and a sample image's lineage reaches the
    dataset hash and the code commit."""
    import cluster.train
    from pipelines.config import load_config
    from pipelines.run import run_pipeline
    from tests.conftest import tiny_overrides
    quickstart = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"
    out = tmp_path / "run"
    cfg = load_config(quickstart, tiny_overrides(out))
    first = run_pipeline(cfg)
    assert set(i["status"] for i in first.stages.values()) == {"ran"}
    files = {str(p): p.stat().st_mtime_ns for p in (out / "stages").rglob("*") if p.is_file()}

    def no_fit(*a, **k):
        raise AssertionError("a cached rerun called Ray Train")
    monkeypatch.setattr(cluster.train, "fit", no_fit)
    again = run_pipeline(cfg)
    assert set(i["status"] for i in again.stages.values()) == {"cached"}
    assert {str(p): p.stat().st_mtime_ns for p in (out / "stages").rglob("*") if p.is_file()} == files
    assert "samples: up to date" in capfd.readouterr().err
    monkeypatch.undo()

    changed = run_pipeline(load_config(quickstart, tiny_overrides(out) + ["diffusion.max_steps=5"]))
    assert {n: i["status"] for n, i in changed.stages.items()} == {
        "data": "cached", "autoencoder": "cached", "clip": "cached", "cache": "cached",
        "diffusion": "ran", "samples": "ran"}
    assert changed.diffusion.diffusion_hash != first.diffusion.diffusion_hash

    row = json.loads(Path(changed.samples.manifest).read_text().splitlines()[0])
    image = out / "samples" / row["path"]
    nodes = lineage_chain(changed.tracker, str(image))
    kinds = [n.kind for n in nodes]
    assert kinds[:8] == ["image", "sample run", "diffusion model", "latent cache", "text encoder", "autoencoder",
                         "dataset", "configs"] and set(kinds[8:]) == {"code"}
    assert nodes[2].id == f"ldmflow-unet/{changed.diffusion.model_version}"
    assert nodes[4].run_id == first.clip.run_id           # trained by the clip stage, reused
    assert nodes[6].id == first.data.dataset_hash
    data_commit = changed.tracker.client.get_run(first.data.run_id).data.tags[TAG["code_commit"]]
    assert data_commit and data_commit in {n.id for n in nodes if n.kind == "code"}
