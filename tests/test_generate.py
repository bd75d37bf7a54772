"""`ldmflow generate`: ids and seeds, bad lines, --out ownership, model references, and exactly-once
generation across crashes (an actor killed mid-commit, a driver SIGKILLed) on a tiny random bundle."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.generate import (GenerateConfig, GenerateError, _claim, _Out, _parse_line, generate, read_manifest,
                                regenerate)
from pipelines.pyfunc import derive_seed
from pipelines.shards import iter_samples
from tests.gen_fixtures import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_seed_is_a_stable_hash_of_id_and_global_seed():
    # Golden values: a change here silently changes every image of every job.
    assert derive_seed("1", 0) == int.from_bytes(hashlib.sha256(b"0\x001").digest()[:8], "big") & (2 ** 63 - 1)
    assert derive_seed("1", 0) == 2906944286496369512
    assert derive_seed("1", 1) != derive_seed("1", 0) != derive_seed("2", 0)
    assert 0 <= derive_seed("x" * 1000, 2 ** 40) < 2 ** 63


def test_parse_line_ids_and_errors():
    assert _parse_line(b"  a red circle \r", 3, "txt") == {"pos": 3, "id": "3", "prompt": "a red circle", "error": ""}
    assert _parse_line(b"   ", 4, "txt") is None                     # blank: not a prompt, still a line
    assert _parse_line(b'{"prompt": "p", "id": 17}', 5, "jsonl")["id"] == "17"
    assert _parse_line(b'{"prompt": "p"}', 6, "jsonl")["id"] == "6"
    assert "not JSON" in _parse_line(b'{"prompt": ', 7, "jsonl")["error"]
    assert "string \"prompt\"" in _parse_line(b'{"text": "p"}', 8, "jsonl")["error"]
    assert "id" in _parse_line(b'{"prompt": "p", "id": [1]}', 9, "jsonl")["error"]
    assert "UTF-8" in _parse_line(b"\xff\xfe", 10, "txt")["error"]


def test_foreign_out_is_refused_and_left_alone(tmp_path):
    out = _Out(str(tmp_path / "out"))
    job = {"fingerprint": "aaaa", "parts": {"model": "m1", "prompts": "p1", "settings": {"steps": 3}}}
    assert _claim(out, job) is False
    assert _claim(out, job) is True                                   # the same job: resume
    before = (tmp_path / "out" / "job.json").read_bytes()
    other = {"fingerprint": "bbbb", "parts": {"model": "m2", "prompts": "p1", "settings": {"steps": 3}}}
    with pytest.raises(GenerateError, match="another generation job.*differs in: model.*Nothing was changed"):
        _claim(out, other)
    assert (tmp_path / "out" / "job.json").read_bytes() == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(GenerateError, match="not empty and holds no job.json"):
        _claim(_Out(str(tmp_path / "busy")), job)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x.txt"]


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_unknown_model_reference_exits_2(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = _cli("--model", "models:/nope@production", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
             "--tracking-uri", uri)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ldmflow: error: model: models:/nope@production: no registered model 'nope'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_local_model_references(tmp_path, monkeypatch):
    from pipelines.generate import ModelRefError, resolve_model
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelRefError, match="neither models:/"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelRefError, match="holds no model bundle"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelRefError, match="--tracking-uri"):
        resolve_model("models:/x/1", None)


# ----------------------------------------------------------------------------------------------
# with Ray and a model

PROMPTS = ['{"prompt": "a red circle"}', "", '{"prompt": "a blue square", "id": "sq"}', "{not json",
           '{"prompt": "again", "id": "sq"}'] + [json.dumps({"prompt": f"shape {i}"}) for i in range(7)]
# valid: lines 1, 3, 6..12 -> 9 prompts; bad: line 4 (JSON), line 5 (repeated id "sq")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    bundle = tiny_bundle(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return root, bundle, prompts


def _cfg(job, out, **kw):
    root, bundle, prompts = job
    return GenerateConfig(model=str(bundle), prompts=str(prompts), out=str(out), batch_size=2, shard_size=3,
                          progress=False, **kw)


def _shard_bytes(out: Path) -> dict[str, list]:
    """Each shard's members: PNG bytes exactly, json but for code_version (other engineers commit to
    this checkout while the test runs, which changes the recorded commit between runs)."""
    def member(s):
        meta = json.loads(s["json"])
        meta.pop("code_version")
        return s["__key__"], s["png"], meta
    return {p.name: [member(s) for s in iter_samples([str(p)])] for p in sorted((out / "shards").iterdir())}


@pytest.mark.slow
def test_bad_lines_stop_before_anything_is_written(ray_local, job):
    root = job[0]
    with pytest.raises(GenerateError, match=r"2 bad line\(s\).*line 4: not JSON.*line 5: repeated id \(first at line 3\)"):
        generate(_cfg(job, root / "stopped", on_bad_line="stop"))
    assert not (root / "stopped").exists()


@pytest.mark.slow
def test_exactly_once_across_crashes(ray_local, job, tmp_path):
    """An uninterrupted run is the reference. A second job is (1) SIGKILLed (its driver process) once
    its first chunk is committed, chunk 1 held back so the kill lands there, (2) resumed with an actor
    that dies after writing chunk 2's shard but before its manifest part, (3) resumed to the end by
    the CLI. It ends with the same 9 ids once each, the same shard bytes, and made only what was
    missing each time."""
    root = job[0]
    ref = generate(_cfg(job, root / "ref"))
    assert (ref.num_images, ref.num_generated, ref.num_bad_lines) == (9, 9, 2)
    assert [b["line"] for b in ref.bad_lines] == [4, 5]
    table = read_manifest(str(root / "ref")).to_pylist()
    assert [r["id"] for r in table] == ["1", "sq", "6", "7", "8", "9", "10", "11", "12"]
    assert [r["seed"] for r in table] == [derive_seed(r["id"], 0) for r in table]

    out = tmp_path / "job"
    address = ray_local.address_info["address"]
    # Chunk 1 stalls (fault "stall:1"): without it the tiny model committed all three chunks within
    # one 0.2 s poll of the manifest folder in 2 of 3 runs, and nothing was left to resume.
    driver = (f"import ray; ray.init(address={address!r}); from pipelines.generate import GenerateConfig, generate; "
              f"generate(GenerateConfig(model={str(job[1])!r}, prompts={str(job[2])!r}, out={str(out)!r}, "
              f"batch_size=2, shard_size=3, progress=False, fault='stall:1'))")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list((out / "manifest").glob("*.parquet")) if (out / "manifest").is_dir() else True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no chunk committed in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = {p.name for p in (out / "manifest").glob("*.parquet")}
    assert committed == {"000000.parquet"} and not (out / "manifest.parquet").exists()

    missing = sorted({"000000.parquet", "000001.parquet", "000002.parquet"} - committed)
    victim = int(missing[-1].split(".")[0])
    with pytest.raises(Exception):   # the actor dies between the shard and its manifest part
        generate(_cfg(job, out, fault=f"shard:{victim}"))
    assert (out / "shards" / f"{victim:06d}.tar").exists()
    assert not (out / "manifest" / f"{victim:06d}.parquet").exists()

    # (3) through the CLI, as a user resumes a job.
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(job[1]), "--prompts",
                           str(job[2]), "--out", str(out), "--batch-size", "2", "--shard-size", "3", "--address",
                           address, "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "summary.json").read_text())
    assert res["num_images"] == 9 and 0 < res["num_generated"] < 9
    final = read_manifest(str(out)).to_pylist()
    assert [r["id"] for r in final] == [r["id"] for r in table]
    assert [r["png_sha256"] for r in final] == [r["png_sha256"] for r in table]
    assert _shard_bytes(out) == _shard_bytes(root / "ref")
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    ids = [json.loads(s["json"])["id"] for s in iter_samples(sorted(str(p) for p in (out / "shards").glob("*.tar")))]
    assert sorted(ids) == sorted(r["id"] for r in table) and len(set(ids)) == 9

    # Same arguments once more: nothing to do. Other settings: refused, nothing changed.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    again = generate(_cfg(job, out, tracking_uri=uri))
    assert (again.num_images, again.num_generated) == (9, 0)
    from mlflow.tracking import MlflowClient
    run = MlflowClient(uri).get_run(again.run_id)   # the summary run: metrics, lineage tags, a grid
    assert run.data.metrics["num_images"] == 9 and run.data.metrics["num_bad_lines"] == 2
    assert run.data.tags["ldmflow.latent_cache_key"] == "tiny" and run.data.params["steps"] == "3"
    assert {a.path for a in MlflowClient(uri).list_artifacts(again.run_id, "images")} == {"images/grid.png"}
    assert json.loads((out / "summary.json").read_text())["num_images"] == 9
    with pytest.raises(GenerateError, match="another generation job.*settings"):
        generate(_cfg(job, out, steps=2))
    assert _shard_bytes(out) == _shard_bytes(root / "ref")

    # One image regenerated alone, bit for bit, from its job's record.
    png = regenerate(str(out), "sq")
    assert hashlib.sha256(png).hexdigest() == final[1]["png_sha256"]
    meta = json.loads(next(s["json"] for s in iter_samples([str(out / "shards" / "000000.tar")])))
    assert {"id", "prompt", "seed", "sampler", "steps", "guidance_scale", "model", "code_version"} <= set(meta)


@pytest.mark.slow
def test_parquet_prompts_ids_and_bad_rows(ray_local, tmp_path):
    """.parquet: the "id" column when present, else the 0-based row; null prompts and ids are bad rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipelines.generate import _chunks, _scan
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c", "d"], "id": ["x", "y", None, "x"]}), path)
    scan = _scan(str(path))
    assert scan.num_valid == 1
    assert scan.bad == [{"line": 1, "error": "prompt is null, empty or not a string"},
                        {"line": 2, "error": "id is null or empty"},
                        {"line": 3, "error": "repeated id (first at line 0)"}]
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(5)]}), path)
    scan = _scan(str(path))
    chunks = list(_chunks(str(path), scan, 2, done={1}))
    assert [(k, rows["id"]) for k, rows in chunks] == [(0, ["0", "1"]), (2, ["4"])]


@pytest.mark.slow
def test_two_actors_on_two_cpus_and_more_asked_than_fit(ray_local, job, tmp_path, capsys):
    """The prompt read takes no CPU, so a 2-CPU Ray runs concurrency=2 as two actors (it used to
    keep one CPU back and silently run one); asking for more than fits says so and runs what fits."""
    two = generate(_cfg(job, tmp_path / "two", concurrency=2))
    assert two.num_actors == 2 and two.num_images == 9
    five = generate(_cfg(job, tmp_path / "five", concurrency=5))
    assert five.num_actors == 2 and five.num_images == 9
    assert "concurrency 5: only 2 CPU(s) free in the Ray cluster; running 2 actor(s)" in capsys.readouterr().err
    assert _shard_bytes(tmp_path / "five") == _shard_bytes(tmp_path / "two")   # actors do not change images
