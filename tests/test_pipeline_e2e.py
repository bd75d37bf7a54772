"""The whole pipeline through Ray and MLflow on tiny models: runs, tags, artifacts, lineage links."""
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config import load_config
from pipelines.run import OutputDirError, run_pipeline
from pipelines.tracking import TAG
from tests.conftest import tiny_overrides

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    prompts = out.parent / "prompts.jsonl"
    prompts.write_text('{"prompt": "a large red circle in the center", "seed": 7}\n'
                       '{"prompt": "a small blue square in the top left"}\n')
    cfg = load_config(QUICKSTART, tiny_overrides(out) + [f"sample.prompts={prompts}"])
    return cfg, run_pipeline(cfg)


def _child_runs(res):
    client = res.tracker.client
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{res.pipeline_run_id}'")
    return {r.data.tags[TAG["stage"]]: r for r in runs}


def test_every_stage_is_a_finished_nested_run(pipeline):
    _, res = pipeline
    runs = _child_runs(res)
    assert set(runs) == {"data", "autoencoder", "clip", "cache", "diffusion", "sample"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags[TAG["pipeline"]] == "tiny"
        assert run.data.params, f"{name} logged no params"
    parent = res.tracker.client.get_run(res.pipeline_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["diffusion.unet.channels"] == "16"


def test_lineage_links(pipeline):
    _, res = pipeline
    runs = _child_runs(res)
    t = {name: r.data.tags for name, r in runs.items()}
    ds_hash = t["data"][TAG["dataset_hash"]]
    assert ds_hash == res.data.dataset_hash
    assert t["autoencoder"][TAG["dataset_hash"]] == ds_hash
    assert t["cache"][TAG["dataset_hash"]] == ds_hash
    ae_hash = t["autoencoder"][TAG["autoencoder_hash"]]
    assert t["cache"][TAG["autoencoder_hash"]] == ae_hash
    assert t["cache"][TAG["autoencoder_version"]] == t["autoencoder"][TAG["autoencoder_version"]]
    key = t["cache"][TAG["latent_cache_key"]]
    assert t["diffusion"][TAG["latent_cache_key"]] == key == t["sample"][TAG["latent_cache_key"]]
    assert t["sample"][TAG["diffusion_version"]] == t["diffusion"][TAG["diffusion_version"]]
    assert t["sample"][TAG["autoencoder_hash"]] == ae_hash
    # upstream run ids point at the runs that made the inputs
    assert runs["data"].info.run_id in t["autoencoder"][TAG["upstream_runs"]]
    assert runs["cache"].info.run_id in t["diffusion"][TAG["upstream_runs"]]
    # the text encoder the cache used is the one the clip stage trained and registered
    te_hash = t["clip"][TAG["text_encoder_hash"]]
    assert t["cache"][TAG["text_encoder_hash"]] == te_hash == res.clip.text_encoder_hash
    assert t["cache"][TAG["text_encoder_version"]] == t["clip"][TAG["text_encoder_version"]]
    assert runs["clip"].info.run_id in t["cache"][TAG["upstream_runs"]]
    assert t["clip"][TAG["dataset_hash"]] == ds_hash
    # the cache key records exactly what made the latents
    manifest = json.loads((Path(res.cache.directory) / "manifest.json").read_text())
    assert manifest["key"] == key
    assert manifest["key_parts"]["autoencoder_hash"] == ae_hash
    assert float(manifest["key_parts"]["scale_factor"]) == pytest.approx(res.autoencoder.scale_factor)
    assert manifest["key_parts"]["resolution"] == 32
    assert manifest["key_parts"]["text_encoder_hash"] == te_hash
    assert "center_crop" in manifest["key_parts"]["transforms"]


def test_model_registry_versions_and_aliases(pipeline):
    _, res = pipeline
    client = res.tracker.client
    runs = _child_runs(res)
    ae = client.get_model_version_by_alias("ldmflow-autoencoder", "tiny")
    assert ae.run_id == runs["autoencoder"].info.run_id
    assert str(ae.version) == res.autoencoder.model_version
    assert ae.tags[TAG["dataset_hash"]] == res.data.dataset_hash
    # the whole pipeline as a pyfunc model: prompts in, images out
    import mlflow.pyfunc
    pm = client.get_model_version_by_alias("ldmflow-pipeline", "tiny")
    assert str(pm.version) == res.samples.pipeline_model_version
    mlflow.set_tracking_uri(res.tracker.uri)
    mlflow.set_registry_uri(res.tracker.uri)
    model = mlflow.pyfunc.load_model(f"models:/ldmflow-pipeline/{pm.version}")
    out = model.predict(["a small red circle at the top left"])
    assert len(out) == 1 and out["image"][0][:8] == b"\x89PNG\r\n\x1a\n"
    unet = client.get_model_version_by_alias("ldmflow-unet", "tiny")
    assert unet.run_id == runs["diffusion"].info.run_id
    assert unet.tags[TAG["latent_cache_key"]] == res.cache.key


def test_artifacts_exist(pipeline):
    _, res = pipeline
    client = res.tracker.client
    runs = _child_runs(res)

    def listed(run, path=""):
        return {Path(f.path).name for f in client.list_artifacts(run.info.run_id, path)}

    assert {"model.safetensors", "config.json"} <= listed(runs["autoencoder"], "autoencoder")
    assert "reconstructions.png" in listed(runs["autoencoder"], "images")
    assert {"unet", "unet_ema", "schedule.json"} <= listed(runs["diffusion"], "diffusion")
    assert "preview.png" in listed(runs["data"], "images")
    assert "grid.png" in listed(runs["sample"], "images")
    assert "manifest.jsonl" in listed(runs["sample"])
    for run in runs.values():
        assert "config.json" in listed(run)
    # resolved stage configs also sit beside the outputs
    assert json.loads((Path(res.output_dir) / "diffusion" / "config.json").read_text())["max_steps"] == 4
    # the latent scale lives in the autoencoder's artifact
    ae_cfg = json.loads((Path(res.autoencoder.directory) / "config.json").read_text())
    assert ae_cfg["extra"]["scale_factor"] == pytest.approx(res.autoencoder.scale_factor)
    assert res.autoencoder.scale_factor > 0
    # metrics: loss curves with several points
    hist = client.get_metric_history(runs["diffusion"].info.run_id, "train/loss")
    assert len(hist) >= 2


def test_samples_and_manifest(pipeline):
    cfg, res = pipeline
    rows = [json.loads(line) for line in Path(res.samples.manifest).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a large red circle in the center", "a small blue square in the top left"]
    assert rows[0]["seed"] == 7 and rows[1]["seed"] == cfg.sample.seed + 1
    for r in rows:
        assert r["sampler"] == "ddim" and r["steps"] == 3
        assert r["diffusion_model_version"] == res.diffusion.model_version
        im = Image.open(Path(res.samples.directory) / r["path"])
        assert im.size == (32, 32)


def test_rerun_resumes_and_foreign_config_is_refused(pipeline):
    cfg, res = pipeline
    files = {p: p.stat().st_mtime_ns for p in (Path(res.output_dir) / "stages").rglob("*") if p.is_file()}
    again = run_pipeline(cfg)                      # same config: every stage a cache hit
    assert {i["status"] for i in again.stages.values()} == {"cached"}
    assert again.diffusion.diffusion_hash == res.diffusion.diffusion_hash
    assert again.samples.manifest == res.samples.manifest
    assert {p: p.stat().st_mtime_ns for p in files} == files      # nothing recomputed or rewritten
    # another pipeline's config (another name) in this output dir is refused, the dir untouched
    marker = (Path(res.output_dir) / "pipeline.json").read_text()
    other = load_config(data={**json.loads(marker)["config"], "name": "other", "seed": 123})
    with pytest.raises(OutputDirError, match="already holds the results of another pipeline"):
        run_pipeline(other)
    assert (Path(res.output_dir) / "pipeline.json").read_text() == marker
