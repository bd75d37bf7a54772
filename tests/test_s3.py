"""Object storage against a real S3 API on loopback (moto's server mode): cluster/storage.py's
helpers, shards and checkpoint listings at s3:// URLs, MLflow artifacts in the bucket, and (slow)
the tiny pipeline with its shards, latent cache, Ray Train checkpoints and MLflow artifacts all in
the bucket, a second run reusing the cache."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster import storage
from cluster.storage import StorageError
from tests.s3_fixtures import moto_server, s3_environ

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One moto server for the module, its env in os.environ while the module's tests run."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server, s3_environ(server):
        yield server


def _shapes_shards(out: Path, split: str, n_shards: int, per_shard: int = 8) -> list[Path]:
    """Tiny shapes shards written in-process (the data stage's shard writer, no Ray)."""
    from pipelines.config import DataConfig
    from pipelines.data import _write_generated_shard
    cfg = DataConfig(resolution=32, shard_size=per_shard)
    cfg_dict = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    paths = []
    for n in range(n_shards):
        p = out / split / f"{n:03d}.tar"
        _write_generated_shard(cfg_dict, 2 * cfg.seed + (split != "train"), split,
                               list(range(n * per_shard, (n + 1) * per_shard)), str(p))
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# cluster/storage.py


def test_join_and_is_url():
    assert storage.is_url("s3://b/x") and not storage.is_url("/tmp/x") and not storage.is_url("file:///tmp/x")
    assert storage.join("s3://b/x/", "k", "/m.json") == "s3://b/x/k/m.json"
    assert storage.join("/tmp/x", "k") == "/tmp/x/k"


def test_text_listing_and_existence(s3, tmp_path):
    base = s3.url("unit", "text")
    storage.write_text(storage.join(base, "a", "meta.json"), '{"step": 3}')
    storage.write_text(storage.join(base, "b.txt"), "x")
    assert storage.read_text(storage.join(base, "a", "meta.json")) == '{"step": 3}'
    assert storage.isfile(storage.join(base, "b.txt")) and not storage.isfile(storage.join(base, "a"))
    assert storage.exists(storage.join(base, "a")) and not storage.exists(storage.join(base, "zzz"))
    assert storage.listdir(base) == ["a", "b.txt"]
    assert storage.listdir(base, dirs_only=True) == ["a"]
    assert storage.listdir(storage.join(base, "absent")) == []
    # the same calls on a local directory
    storage.write_text(tmp_path / "b.txt", "x")
    (tmp_path / "a").mkdir()
    assert storage.listdir(tmp_path) == ["a", "b.txt"] and storage.listdir(tmp_path, dirs_only=True) == ["a"]


def test_listing_sees_writes_from_another_client(s3):
    """fsspec caches listings per instance: a checkpoint a Ray worker wrote must still be seen."""
    base = s3.url("unit", "fresh")
    assert storage.listdir(base) == []
    s3.client().put_object(Bucket=s3.bucket, Key="unit/fresh/checkpoint_1/meta.json", Body=b"{}")
    assert storage.listdir(base) == ["checkpoint_1"]
    assert storage.isfile(storage.join(base, "checkpoint_1", "meta.json"))


def test_upload_download_round_trip(s3, tmp_path):
    src = tmp_path / "src"
    for rel, data in {"manifest.json": b"{}", "shards/0.tar": b"a" * 1000, "shards/1.tar": b"b",
                      "text_encoder/config.json": b"{1}"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    url = s3.url("unit", "roundtrip")
    order = storage.upload_dir(src, url, last=["manifest.json"])
    assert order[-1] == "manifest.json" and sorted(order) == sorted(
        ["manifest.json", "shards/0.tar", "shards/1.tar", "text_encoder/config.json"])
    assert s3.keys("unit/roundtrip/") == [f"unit/roundtrip/{r}" for r in sorted(order)]
    got = storage.download_dir(url, tmp_path / "dst", exclude=("shards/",))
    assert got == ["manifest.json", "text_encoder/config.json"]
    assert (tmp_path / "dst" / "text_encoder" / "config.json").read_bytes() == b"{1}"
    assert not (tmp_path / "dst" / "shards").exists()


def test_interrupted_upload_leaves_no_marker(s3, tmp_path, monkeypatch):
    """The marker goes last: an upload that fails on the way never shows a manifest, so a latent
    cache is never reused half-uploaded."""
    from pipelines.cache_latents import _remote_complete
    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    (src / "shards" / "0.tar").write_bytes(b"x")
    (src / "manifest.json").write_text("{}")
    url = s3.url("unit", "partial")
    fs, _ = storage.filesystem(url)   # fsspec hands upload_dir this same cached instance
    real = fs.put_file

    def put_file(lpath, rpath, *a, **kw):   # the connection drops at the marker
        if rpath.endswith("manifest.json"):
            raise ConnectionError("simulated drop")
        return real(lpath, rpath, *a, **kw)

    monkeypatch.setattr(fs, "put_file", put_file)
    with pytest.raises(ConnectionError):
        storage.upload_dir(src, url, last=["manifest.json"])
    assert s3.keys("unit/partial/") == ["unit/partial/shards/0.tar"]
    assert not _remote_complete(url)
    monkeypatch.undo()
    storage.upload_dir(src, url, last=["manifest.json"])
    assert _remote_complete(url)


def test_missing_bucket_is_named(s3):
    with pytest.raises(StorageError, match=r"cache.root: bucket 'no-such-bucket' does not exist"):
        storage.check_location("s3://no-such-bucket/latents", "cache.root")
    storage.check_location(s3.url("anything"), "cache.root")   # exists: passes
    storage.check_location("/tmp/somewhere", "cache.root")       # local: created on use


def test_check_storage_names_the_field(s3, tmp_path):
    from pipelines.config import load_config
    from pipelines.stage import check_storage
    from tests.conftest import tiny_overrides
    good = tiny_overrides(tmp_path) + [f"cache.root={s3.url('latents')}",
                                       f"cluster.storage_uri={s3.url('ray')}"]
    check_storage(load_config(QUICKSTART, good))
    for field, url in [("cache.root", "s3://missing-cache/latents"),
                       ("cluster.storage_uri", "s3://missing-ray/ray"),
                       ("tracking.artifact_location", "s3://missing-mlflow/a")]:
        cfg = load_config(QUICKSTART, good + [f"{field}={url}"])
        with pytest.raises(StorageError, match=rf"{field}: bucket '{url.split('/')[2]}' does not exist"):
            check_storage(cfg)


def test_stage_refuses_a_missing_bucket_before_starting(s3, tmp_path):
    """Every stage checks the pipeline's storage URLs first: the data stage, before any training,
    fails naming the field and the bucket, and no stage run is opened."""
    from pipelines.config import load_config
    from pipelines.stage import StageContext
    from tests.conftest import tiny_overrides

    class Tracker:   # records what the stage would log
        calls: list = []

        def __getattr__(self, name):
            return lambda *a, **kw: self.calls.append(name)

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path) + ["cluster.storage_uri=s3://no-such-bucket/ray"])
    ctx = StageContext(config=cfg, output_dir=tmp_path, tracker=Tracker(), pipeline_run_id="p", code_version="v",
                       env={})
    with pytest.raises(StorageError, match="cluster.storage_uri: bucket 'no-such-bucket' does not exist"):
        with ctx.stage_run("data", cfg.data):
            pass
    assert Tracker.calls == []


def test_storage_uri_validated():
    from pipelines.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="cluster.storage_uri: expected a URL"):
        load_config(QUICKSTART, ["cluster.storage_uri=relative/dir"])
    assert load_config(QUICKSTART, ["cluster.storage_uri=s3://b/ray"]).cluster.storage_uri == "s3://b/ray"


def test_pyarrow_filesystem_carries_the_endpoint(s3):
    """Ray Train and Ray Data get a pyarrow filesystem pickled to workers: the endpoint travels in it."""
    import pyarrow.fs as pafs
    s3.client().put_object(Bucket=s3.bucket, Key="unit/pa/x.bin", Body=b"12345")
    fs, path = storage.pyarrow_filesystem(s3.url("unit", "pa"))
    assert path == f"{s3.bucket}/unit/pa"
    env = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL",)}   # as on a worker without the variable
    try:
        fs2 = pickle.loads(pickle.dumps(fs))
        infos = fs2.get_file_info(pafs.FileSelector(path))
    finally:
        os.environ.update(env)
    assert [(i.path, i.size) for i in infos] == [(f"{path}/x.bin", 5)]


# ----------------------------------------------------------------------------------------------
# shards and checkpoints at s3:// URLs


def test_shards_at_s3_read_like_local(s3, tmp_path):
    from pipelines.data import check_shard
    from pipelines.shards import ShardError, expand_urls, iter_samples, rank_batches
    local = _shapes_shards(tmp_path, "train", 4)
    storage.upload_dir(tmp_path / "train", s3.url("shards", "train"))
    urls = expand_urls(s3.url("shards", "train", "{000..003}.tar"))
    assert urls == [s3.url("shards", "train", f"{n:03d}.tar") for n in range(4)]
    assert expand_urls(s3.url("shards", "train")) == urls               # a "directory" of shards
    assert [s["__key__"] for s in iter_samples(urls)] == [s["__key__"] for s in iter_samples(map(str, local))]
    # the data stage's check: same counts and content hashes as the local copy
    assert [{**check_shard(u), "url": None} for u in urls] == [{**check_shard(str(p)), "url": None} for p in local]

    def to_arrays(s):
        return {"n": np.array(int(s["json"]["index"]))}
    remote = next(rank_batches(urls, 0, 2, seed=1, batch_size=4, to_arrays=to_arrays))
    here = next(rank_batches([str(p) for p in local], 0, 2, seed=1, batch_size=4, to_arrays=to_arrays))
    assert remote["n"].tolist() == here["n"].tolist()
    with pytest.raises(ShardError, match="no-such-bucket"):
        expand_urls("s3://no-such-bucket/shards/{000..001}.tar")


def test_run_checkpoints_and_latest_at_a_url(s3):
    from cluster.train import run_checkpoints
    from pipelines.train_diffusion import META, latest_checkpoint
    base = s3.url("unit", "ray")
    c = s3.client()
    for name, step in [("checkpoint_2024-01-01_00-00-01.000000", 2), ("checkpoint_2024-01-01_00-00-03.000000", 4)]:
        c.put_object(Bucket=s3.bucket, Key=f"unit/ray/run/{name}/{META}", Body=json.dumps({"step": step}).encode())
    # newest by name, but incomplete (no meta.json yet): never the one to resume from
    c.put_object(Bucket=s3.bucket, Key="unit/ray/run/checkpoint_2024-01-01_00-00-05.000000/rank0.pt", Body=b"x")
    c.put_object(Bucket=s3.bucket, Key="unit/ray/run/.validate_storage_marker", Body=b"")
    ckpts = run_checkpoints(base, "run")
    assert ckpts == [f"{base}/run/checkpoint_2024-01-01_00-00-0{i}.000000" for i in (1, 3, 5)]
    assert latest_checkpoint(base, "run") == ckpts[1]
    assert run_checkpoints(base, "never-ran") == [] and latest_checkpoint(base, "never-ran") is None


def test_stage_ray_storage_is_per_output_dir(s3, tmp_path):
    """cluster.storage_uri: each stage's Ray directory names its own location under the URL; the
    same one again on re-entry, a fresh one once the runner removed it (a forced rerun)."""
    from pipelines.config import load_config
    from pipelines.stage import StageContext
    from tests.conftest import tiny_overrides
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path) + [f"cluster.storage_uri={s3.url('ray')}"])
    ray_dir = tmp_path / "ray_results" / "autoencoder-abc"
    ctx = StageContext(config=cfg, output_dir=tmp_path, tracker=None, pipeline_run_id="p", code_version="v",
                       env={}, ray_dir=ray_dir)
    first = ctx.ray_storage
    assert isinstance(first, str) and first.startswith(s3.url("ray", "tiny-autoencoder-abc-"))
    assert ctx.ray_storage == first
    import shutil
    shutil.rmtree(ray_dir)
    assert ctx.ray_storage not in (first, None) and ctx.ray_storage.startswith(s3.url("ray"))
    local = load_config(QUICKSTART, tiny_overrides(tmp_path))
    assert StageContext(config=local, output_dir=tmp_path, tracker=None, pipeline_run_id="p", code_version="v",
                        env={}, ray_dir=ray_dir).ray_storage == ray_dir


# ----------------------------------------------------------------------------------------------
# MLflow artifacts in the bucket


def test_mlflow_artifacts_client_side(s3, tmp_path):
    """tracking.artifact_location=s3://...: the embedded SQLite store, artifacts written by the client."""
    from pipelines.tracking import Tracker
    t = Tracker.embedded(tmp_path, None, s3.url("mlflow-client"), "s3-client")
    run = t.start_run("r")
    t.log_dict(run, {"a": 1}, "cfg/config.json")
    t.end_run(run)
    keys = s3.keys("mlflow-client/")
    assert any(k.endswith(f"{run}/artifacts/cfg/config.json") for k in keys), keys
    assert t.artifact_uri(run).startswith(s3.url("mlflow-client"))


@pytest.mark.slow
def test_mlflow_artifacts_server_side(s3, tmp_path):
    """`mlflow server --artifacts-destination s3://... --serve-artifacts`: the client uploads through
    the server (mlflow-artifacts:/), which writes into the bucket."""
    from pipelines.tracking import Tracker
    from tests.cluster_fixtures import mlflow_server
    with mlflow_server(tmp_path, artifacts_destination=s3.url("mlflow-server"), env=s3.env) as url:
        t = Tracker.embedded(tmp_path / "client", url, None, "s3-server")
        run = t.start_run("r")
        t.log_dict(run, {"b": 2}, "config.json")
        t.end_run(run)
        assert t.artifact_uri(run).startswith("mlflow-artifacts:")
        assert t.client.download_artifacts(run, "config.json", str(tmp_path)) and json.loads(
            (tmp_path / "config.json").read_text()) == {"b": 2}
    keys = s3.keys("mlflow-server/")
    assert any(k.endswith(f"{run}/artifacts/config.json") for k in keys), keys


# ----------------------------------------------------------------------------------------------
# the whole pipeline with everything in the bucket


def _ldmflow_run(cfg_overrides: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    """`ldmflow run` in its own process: its own local Ray, started with the S3 env (Ray workers
    inherit it), so a session Ray of other tests is neither needed nor disturbed."""
    with open(log, "a") as f:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(QUICKSTART), *cfg_overrides],
                              cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                              timeout=1800)


@pytest.mark.slow
def test_pipeline_with_everything_in_s3(s3, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import TAG
    from tests.conftest import tiny_overrides
    local = tmp_path / "shards"
    _shapes_shards(local, "train", 4, per_shard=32)
    _shapes_shards(local, "val", 1, per_shard=32)
    storage.upload_dir(local, s3.url("data"))
    out = tmp_path / "run"
    overrides = tiny_overrides(out) + [
        "clip.enabled=false", "data.source=shards",
        f"data.train_urls={s3.url('data', 'train', '{000..003}.tar')}",
        f"data.val_urls={s3.url('data', 'val', '000.tar')}",
        f"cache.root={s3.url('latents')}", f"cluster.storage_uri={s3.url('ray')}",
        f"tracking.artifact_location={s3.url('mlflow')}"]
    log = tmp_path / "ldmflow.log"
    r = _ldmflow_run(overrides, s3.env, log)
    assert r.returncode == 0, log.read_text()[-6000:]

    # The bucket holds the cache (manifest uploaded last), Ray checkpoints, MLflow artifacts.
    cache_keys = [k for k in s3.keys("latents/") if "/" in k[len("latents/"):]]
    key = cache_keys[0].split("/")[1]
    times = s3.last_modified(f"latents/{key}/")
    manifest = f"latents/{key}/manifest.json"
    assert manifest in times and times[manifest] >= max(times.values())
    listed = json.loads(storage.read_text(s3.url(manifest)))["shards"]
    assert listed and all(f"latents/{key}/{s}" in times for s in listed)
    assert any(k.startswith(f"latents/{key}/text_encoder/") for k in times)
    assert not (out / "latents" / key / "shards").exists()       # local copy: the small files only
    ray_keys = s3.keys("ray/")
    for stage in ("autoencoder", "diffusion"):
        assert any(f"/{stage}-" in k and "/checkpoint_" in k for k in ray_keys), stage
    assert not list((out / "ray_results").rglob("checkpoint_*"))   # nothing persisted locally
    mlflow_keys = s3.keys("mlflow/")
    assert any(k.endswith("/artifacts/manifest.json") for k in mlflow_keys)
    assert any("/artifacts/diffusion/unet/" in k for k in mlflow_keys)

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")

    def cache_run():
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG['stage']}` = 'cache'",
                                  order_by=["attributes.start_time DESC"])
        return runs[0]
    first = cache_run()
    assert first.data.tags["ldmflow.cache_reused"] == "False"
    assert first.data.tags["ldmflow.cache_uri"] == s3.url("latents", key)

    # Another machine, same key: this output dir's cache stage and local copy gone, the bucket's kept.
    import shutil
    shutil.rmtree(out / "latents")
    shutil.rmtree(out / "stages" / "cache")
    (out / "cache").unlink()
    r = _ldmflow_run(overrides, s3.env, log)
    assert r.returncode == 0, log.read_text()[-6000:]
    second = cache_run()
    assert second.info.run_id != first.info.run_id
    assert second.data.tags["ldmflow.cache_reused"] == "True"
    assert second.data.tags[TAG["latent_cache_key"]] == key
    assert s3.last_modified(f"latents/{key}/") == times                 # nothing uploaded again
    assert (out / "latents" / key / "text_encoder").is_dir() and (out / "latents" / key / "null_text.npz").is_file()
