"""Stage caching: keys from (resolved config, input content hashes, code), hits, stale reruns,
--force, interrupted attempts, the output-dir rules, and the code hash itself.

The fast tests run the real runner (pipelines.run.run_stages, real MLflow) with stand-in stage
functions that write files and count their calls; the slow test runs the tiny pipeline for real."""
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import pipelines.run as runmod
from pipelines.config import ConfigError, load_config
from pipelines.lineage import module_closure, stage_code_hash
from pipelines.run import STAGES, OutputDirError, _claim_output_dir, _context, run_stages
from pipelines.stage import (AutoencoderArtifact, DatasetArtifact, DiffusionArtifact, LatentCacheArtifact,
                             SampleArtifact)
from pipelines.tracking import TAG


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class FakeStages:
    """Stand-ins for the six stages: each writes a file in its stage dir, opens its MLflow run with
    the lineage tags the real stage sets, and counts calls. Training is not reproducible (the call
    number goes into the weights); data is (a pure function of the config), like the real ones."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.fail: set[str] = set()
        for name, fn in (("data", self.data), ("autoencoder", self.autoencoder), ("cache", self.cache),
                         ("diffusion", self.diffusion), ("samples", self.samples)):
            monkeypatch.setitem(STAGES, name, dataclasses.replace(STAGES[name], run=fn))

    def _enter(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name}: injected failure")

    def data(self, cfg, ctx, a):
        self._enter("data")
        out = ctx.stage_dir("data")
        with ctx.stage_run("data", cfg.data) as run_id:
            shard = out / "train" / "train-000000.tar"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_text(f"shapes seed {cfg.data.seed} n {cfg.data.num_train}")
            h = _h(shard.read_text())
            ctx.tracker.set_tags(run_id, {TAG["dataset_hash"]: h})
            ctx.tracker.log_dict(run_id, {"train_urls": [str(shard)], "val_urls": []}, "shards.json")
            return DatasetArtifact([str(shard)], [], cfg.data.num_train, 0, h, "shapes", run_id)

    def autoencoder(self, cfg, ctx, a):
        self._enter("autoencoder")
        d = a["data"]
        model = ctx.stage_dir("autoencoder") / "model"
        with ctx.stage_run("autoencoder", cfg.autoencoder, {TAG["dataset_hash"]: d.dataset_hash,
                                                            TAG["upstream_runs"]: d.run_id}) as run_id:
            model.mkdir(parents=True, exist_ok=True)
            (model / "model.safetensors").write_text(f"{d.dataset_hash} {len(self.calls)}")
            h = _h((model / "model.safetensors").read_text())
            version = ctx.tracker.register_model("fake-autoencoder", run_id, "", [ctx.config.name])
            ctx.tracker.set_tags(run_id, {TAG["autoencoder_hash"]: h, TAG["autoencoder_version"]: version})
            return AutoencoderArtifact(str(model), h, 0.5, d.dataset_hash, version, run_id)

    def cache(self, cfg, ctx, a):
        self._enter("cache")
        d, ae = a["data"], a["autoencoder"]
        key = _h(ae.autoencoder_hash, d.dataset_hash)
        tags = {TAG["dataset_hash"]: d.dataset_hash, TAG["autoencoder_hash"]: ae.autoencoder_hash,
                TAG["autoencoder_version"]: ae.model_version, TAG["upstream_runs"]: f"{d.run_id},{ae.run_id}"}
        with ctx.stage_run("cache", cfg.cache, tags) as run_id:
            ctx.tracker.set_tags(run_id, {TAG["latent_cache_key"]: key, TAG["text_encoder_hash"]: "te0"})
            lat = ctx.output_dir / "latents" / key
            lat.mkdir(parents=True, exist_ok=True)
            return LatentCacheArtifact(str(lat), key, [], d.num_train, "", "te0", "", 0.5, [4, 4, 4], [8, 32],
                                       ae.autoencoder_hash, ae.model_version, d.dataset_hash, run_id)

    def diffusion(self, cfg, ctx, a):
        self._enter("diffusion")
        c = a["cache"]
        out = ctx.stage_dir("diffusion") / "model"
        with ctx.stage_run("diffusion", cfg.diffusion, {TAG["latent_cache_key"]: c.key,
                                                        TAG["upstream_runs"]: c.run_id}) as run_id:
            out.mkdir(parents=True, exist_ok=True)
            (out / "unet.safetensors").write_text(f"{c.key} {cfg.diffusion.max_steps} {len(self.calls)}")
            h = _h((out / "unet.safetensors").read_text())
            version = ctx.tracker.register_model("fake-unet", run_id, "", [ctx.config.name, "candidate"])
            ctx.tracker.set_tags(run_id, {TAG["diffusion_hash"]: h, TAG["diffusion_version"]: version})
            return DiffusionArtifact(str(out), h, c.key, version, run_id)

    def samples(self, cfg, ctx, a):
        self._enter("samples")
        diff, ae, c = a["diffusion"], a["autoencoder"], a["cache"]
        out = ctx.stage_dir("samples")
        with ctx.stage_run("sample", cfg.sample, {TAG["diffusion_version"]: diff.model_version,
                                                  TAG["upstream_runs"]: f"{diff.run_id},{ae.run_id},{c.run_id}"}
                           ) as run_id:
            (out / "images").mkdir(parents=True, exist_ok=True)
            (out / "images" / "00000000.png").write_bytes(b"png " + diff.diffusion_hash.encode())
            manifest = out / "manifest.jsonl"
            manifest.write_text(json.dumps({"index": 0, "prompt": "a red circle", "seed": 7,
                                            "path": "images/00000000.png", "run_id": run_id,
                                            "diffusion_model_version": diff.model_version}) + "\n")
            return SampleArtifact(str(out), str(manifest), None, 1, run_id)


def _cfg(out, *overrides):
    prompts = Path(out).parent / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("a red circle\n")
    return load_config(data={"name": "fake", "output_dir": str(out), "sample": {"prompts": str(prompts)},
                             "tracking": {"experiment": "fake"}}, overrides=list(overrides))


def _run(cfg, force=()):
    out = Path(cfg.output_dir)
    resumed = _claim_output_dir(cfg, out)
    ctx = _context(cfg, out, resumed)
    return run_stages(ctx, forced=runmod._check_force(cfg, force, False))


def _status(res):
    return {n: i["status"] for n, i in res.stages.items()}


@pytest.fixture
def fake(monkeypatch):
    return FakeStages(monkeypatch)


def _mtimes(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in (out / "stages").rglob("*") if p.is_file()}


def test_rerun_is_all_cache_hits_and_touches_nothing(fake, tmp_path, capfd):
    out = tmp_path / "run"
    first = _run(_cfg(out))
    assert fake.calls == ["data", "autoencoder", "cache", "diffusion", "samples"]
    assert set(_status(first).values()) == {"ran"}
    before = _mtimes(out)
    fake.calls.clear()
    again = _run(_cfg(out))
    assert fake.calls == []
    assert set(_status(again).values()) == {"cached"}
    assert _mtimes(out) == before                      # no output rewritten
    err = capfd.readouterr().err
    for name in ("data", "autoencoder", "cache", "diffusion", "samples"):
        assert f"{name}: up to date (key {first.stages[name]['key']})" in err
    assert again.diffusion == first.diffusion and again.samples == first.samples
    # the current output of each stage is a symlink into its key's directory
    for name in ("data", "samples"):
        assert (out / name).is_symlink()
        assert (out / name).resolve() == (out / "stages" / name / first.stages[name]["key"]).resolve()
    assert json.loads((out / "data" / "artifact.json").read_text())["dataset_hash"] == first.data.dataset_hash
    # the resolved stage config sits beside its outputs, in the key's directory
    assert json.loads((out / "diffusion" / "config.json").read_text())["max_steps"] == 2000


def test_changed_diffusion_setting_reruns_diffusion_and_samples_only(fake, tmp_path, capfd):
    out = tmp_path / "run"
    first = _run(_cfg(out))
    fake.calls.clear()
    second = _run(_cfg(out, "diffusion.max_steps=7"))
    assert fake.calls == ["diffusion", "samples"]
    assert _status(second) == {"data": "cached", "autoencoder": "cached", "cache": "cached",
                               "diffusion": "ran", "samples": "ran"}
    assert "config changed (diffusion.max_steps: 2000 -> 7)" in second.stages["diffusion"]["reason"]
    assert second.stages["samples"]["reason"] == "input changed (diffusion)"
    assert json.loads((out / "diffusion" / "config.json").read_text())["max_steps"] == 7
    # the first config's outputs are intact, so switching back is all hits
    assert Path(first.diffusion.directory, "unet.safetensors").is_file()
    fake.calls.clear()
    third = _run(_cfg(out))
    assert fake.calls == [] and third.diffusion == first.diffusion
    assert json.loads((out / "diffusion" / "config.json").read_text())["max_steps"] == 2000
    marker = json.loads((out / "pipeline.json").read_text())
    assert marker["config"]["diffusion"]["max_steps"] == 2000     # the marker records the latest config


def test_force_reruns_the_stage_and_its_dependents_beside_the_cached_output(fake, tmp_path):
    out = tmp_path / "run"
    first = _run(_cfg(out))
    old_model = Path(first.autoencoder.directory) / "model.safetensors"
    old_bytes = old_model.read_bytes()
    fake.calls.clear()
    forced = _run(_cfg(out), force=["autoencoder"])
    assert fake.calls == ["autoencoder", "cache", "diffusion", "samples"]
    assert _status(forced) == {"data": "cached", "autoencoder": "forced", "cache": "forced",
                               "diffusion": "forced", "samples": "forced"}
    assert forced.autoencoder.autoencoder_hash != first.autoencoder.autoencoder_hash   # retrained
    assert forced.stages["autoencoder"]["key"] == first.stages["autoencoder"]["key"]   # same key
    assert old_model.read_bytes() == old_bytes                 # the earlier output was not overwritten
    assert Path(forced.autoencoder.directory).parent.name.startswith(first.stages["autoencoder"]["key"] + "-f")
    fake.calls.clear()
    assert set(_status(_run(_cfg(out))).values()) == {"cached"} and fake.calls == []


def test_code_change_reruns_that_stage_and_content_cutoff(fake, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(_cfg(out))
    real = runmod.stage_code_hash
    edited = {"pipelines.sample"}
    monkeypatch.setattr(runmod, "stage_code_hash", lambda m: real(m) + ("-edited" if m in edited else ""))
    fake.calls.clear()
    res = _run(_cfg(out))
    assert fake.calls == ["samples"] and res.stages["samples"]["reason"] == "code changed"
    # data is reproducible: a code change that leaves its bytes alone reruns data only
    edited.add("pipelines.data")
    fake.calls.clear()
    res = _run(_cfg(out))
    assert fake.calls == ["data"]
    assert _status(res)["autoencoder"] == "cached"


def test_interrupted_stage_leaves_the_cache_consistent_and_continues(fake, tmp_path):
    out = tmp_path / "run"
    first = _run(_cfg(out))
    fake.fail = {"diffusion"}
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(_cfg(out, "diffusion.max_steps=9"))
    # nothing recorded for the new key; the current diffusion output is still the finished one
    assert (out / "diffusion").resolve() == Path(first.stages["diffusion"]["dir"]).resolve()
    fake.fail = set()
    fake.calls.clear()
    res = _run(_cfg(out, "diffusion.max_steps=9"))
    assert fake.calls == ["diffusion", "samples"] and res.diffusion.directory.startswith(
        str(out / "stages" / "diffusion" / res.stages["diffusion"]["key"]))


def test_output_dir_rules(fake, tmp_path):
    out = tmp_path / "run"
    _run(_cfg(out))
    marker = (out / "pipeline.json").read_text()
    other = load_config(data={**json.loads(marker)["config"], "name": "another"})
    with pytest.raises(OutputDirError, match="another pipeline"):
        _claim_output_dir(other, out)
    assert (out / "pipeline.json").read_text() == marker
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not an ldmflow run directory"):
        _claim_output_dir(_cfg(foreign), foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_force_names_are_checked(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(ConfigError, match="--force: unknown stage 'decoder'"):
        runmod._check_force(cfg, ["decoder"], False)
    with pytest.raises(ConfigError, match="'clip' is disabled"):
        runmod._check_force(cfg, ["clip"], False)
    assert runmod._check_force(cfg, ["cache"], False) == {"cache", "diffusion", "samples"}
    from pipelines.cli import main
    assert main(["run", "quickstart", f"output_dir={tmp_path / 'x'}", "--force", "decoder"]) == 2
    assert "unknown stage 'decoder'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_stage_code_hash_follows_imports_not_docs(tmp_path):
    root = tmp_path / "src"
    for rel, text in {"pipelines/__init__.py": "", "models/__init__.py": "",
                      "pipelines/config.py": "import models.big\n",
                      "pipelines/sample.py": "from pipelines.config import X\ndef f():\n    from models import net\n",
                      "pipelines/data.py": "from . import shards\n", "pipelines/shards.py": "",
                      "models/net.py": "W = 1\n", "models/big.py": "", "README.md": "docs"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert set(module_closure("pipelines.sample", root)) == {"pipelines", "pipelines.sample", "models",
                                                             "models.net"}
    assert set(module_closure("pipelines.data", root)) == {"pipelines", "pipelines.data", "pipelines.shards"}

    def hashes():
        from pipelines.lineage import _stage_code_hash
        _stage_code_hash.cache_clear()
        return stage_code_hash("pipelines.sample", root), stage_code_hash("pipelines.data", root)

    s0, d0 = hashes()
    (root / "README.md").write_text("new docs")
    (root / "models" / "big.py").write_text("# behind the config boundary")
    assert hashes() == (s0, d0)
    (root / "models" / "net.py").write_text("W = 2\n")
    s1, d1 = hashes()
    assert s1 != s0 and d1 == d0
    # the real stages: each a different hash, stable within a process
    real = {m: stage_code_hash(m) for m in {s.module for s in STAGES.values()}}
    assert len(set(real.values())) == len(real)


def test_stage_code_hash_is_the_same_when_packages_are_unpacked_apart(tmp_path):
    """Ray Jobs' py_modules put models/, cluster/ and pipelines/ in separate directories: every
    stage's code hash there equals the local one (same sources), so a submitted run reuses a
    local run's stages and vice versa."""
    import shutil
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    paths = []
    for pkg in ("models", "cluster", "pipelines"):
        shutil.copytree(repo / pkg, tmp_path / f"unpacked_{pkg}" / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
        paths.append(str(tmp_path / f"unpacked_{pkg}"))
    modules = sorted({s.module for s in STAGES.values()})
    code = ("import json, sys; import pipelines.lineage as l; "
            "assert l.__file__.startswith(sys.argv[1]), l.__file__; "
            "print(json.dumps({m: l.stage_code_hash(m) for m in sys.argv[2:]}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), *modules], cwd=tmp_path,
                         env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    apart = json.loads(out.stdout)
    assert apart == {m: stage_code_hash(m) for m in modules}
    # and the closure really spans the packages (a stage that runs models code hashes it)
    assert any(n.startswith("models.") for n in module_closure("pipelines.train_diffusion"))
