"""The train_baseline / evaluate stages and `ldmflow compare`: every family through the pipeline at
tiny sizes, a failing family kept as a row, reruns from the cache, and the literature checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config
from tests.conftest import tiny_overrides
from tests.test_baselines import TINY

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"
RES = 16


def _overrides(out, families, budget=2.0, ldm=False) -> list[str]:
    o = tiny_overrides(out) + [
        f"data.resolution={RES}", f"autoencoder.model.resolution={RES}", f"clip.vision.image_size={RES}",
        "autoencoder.loss.disc_num_layers=2",
        "clip.vision.patch_size=8", "data.num_train=64", "data.num_val=16", "data.shard_size=32",
        f"compare.families={json.dumps(list(families))}", f"compare.budget_cpu_seconds={budget}",
        f"compare.include_ldm={'true' if ldm else 'false'}",
        "baseline.batch_size=8", "baseline.num_workers=2", "baseline.log_every=1",
        "evaluate.num_samples=8", "evaluate.batch_size=8", "evaluate.bpd_images=8",
    ]
    for f in families:
        o.append(f"compare.models.{f}={json.dumps(TINY[f])}")
    return o


# ----------------------------------------------------------------------------------------------
# no Ray

def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^compare.families: unknown baseline 'gpt'"):
        load_config(QUICKSTART, ['compare.families=["vae", "gpt"]'])
    with pytest.raises(ConfigError, match=r"^baseline.family: unknown baseline 'nope'"):
        load_config(QUICKSTART, ["baseline.family=nope"])
    with pytest.raises(ConfigError, match=r"^baseline.model.resolution: set by the data"):
        load_config(QUICKSTART, ['baseline.model={"resolution": 8}'])
    with pytest.raises(ConfigError, match=r"^compare.models.vae.not_a_field: unknown field"):
        load_config(QUICKSTART, ['compare.models.vae={"not_a_field": 1}'])
    with pytest.raises(ConfigError, match=r"^compare.families: listed twice: \['vae'\]"):
        load_config(QUICKSTART, ['compare.families=["vae", "vae"]'])
    with pytest.raises(ConfigError, match=r"^evaluate.inception_weights: features=inception needs"):
        load_config(QUICKSTART, ["evaluate.features=inception"])


def test_literature_checks_and_table_with_na_and_failed_rows():
    from pipelines.compare import _row, literature_checks, render_table
    m = lambda fd, ips, bpd: {"fd": fd, "sample_images_per_s": ips, "bpd": bpd, "precision": 0.5,  # noqa: E731
                              "recall": 0.25, "train_seconds": 60.0, "train_cpu_seconds": 50.0,
                              "verifier_pass_rate": "n/a"}
    rows = {"vae": _row("vae", m(80.0, 900.0, 5.0)), "dcgan": _row("dcgan", m(50.0, 1000.0, "n/a")),
            "pixelcnn": _row("pixelcnn", m(60.0, 3.0, 4.0)), "ddpm": _row("ddpm", m(40.0, 20.0, 4.5)),
            "glow": _row("glow", error="RuntimeError: boom")}
    checks = {c["claim"].split()[0] + str(i): c for i, c in enumerate(literature_checks(rows))}
    agrees = [c["agrees"] for c in checks.values()]
    # slow: pixelcnn 3, ddpm 20 < fast: vae 900, dcgan 1000 -> yes; GAN FD 50 < VAE 80 -> yes;
    # lowest FD is ddpm -> yes; pixelcnn 4.0 < vae 5.0 -> yes; no ppca row -> n/a.
    assert agrees == ["yes", "yes", "yes", "yes", "n/a"], checks
    only_fast = {n: rows[n] for n in ("vae", "dcgan")}   # no slow family, no diffusion row: no verdict
    assert [c["agrees"] for c in literature_checks(only_fast)] == ["n/a", "yes", "n/a", "n/a", "n/a"]
    rows["dcgan"]["fd"] = 90.0
    assert literature_checks(rows)[1]["agrees"] == "no"
    table = render_table(rows, load_config(QUICKSTART))
    assert "| glow | flow | exact | - | failed: RuntimeError: boom |" in table
    assert "| vae | VAE | bound | n/a | 80 | 0.5 | 0.25 | 5 | 900 | 50 | 60 | n/a |" in table
    assert "| dcgan | GAN | none | n/a | 90 |" in table and "NOT comparable to Inception FID" in table


# ----------------------------------------------------------------------------------------------
# through Ray: stages, failures, cache

def test_compare_trains_scores_keeps_failed_rows_and_reruns_from_cache(tmp_path, monkeypatch, capfd):
    """Two families (a likelihood model and a GAN) through train_baseline + evaluate under Ray; the
    GAN's evaluation is made to fail once: it becomes a failed row and the other row survives. The
    rerun recomputes only that failed evaluation."""
    from pipelines import compare as cmp
    import pipelines.evaluate as ev
    out = tmp_path / "run"
    cfg = load_config(QUICKSTART, _overrides(out, ["vae", "dcgan"]))
    real_evaluate = ev.evaluate

    def flaky(cfg_, target, data, ctx, stage_name="evaluate"):
        if target.name == "dcgan":
            raise RuntimeError("injected evaluation failure")
        return real_evaluate(cfg_, target, data, ctx, stage_name)
    monkeypatch.setattr(ev, "evaluate", flaky)
    rows = cmp.compare(cfg)
    assert rows["dcgan"]["error"] == "RuntimeError: injected evaluation failure"
    vae = rows["vae"]
    assert vae["error"] is None and vae["steps"] >= 1
    assert math.isfinite(vae["fd"]) and vae["fd"] >= 0 and 0 <= vae["precision"] <= 1 and 0 <= vae["recall"] <= 1
    assert vae["bpd"] > 0 and vae["sample_images_per_s"] > 0 and vae["train_cpu_seconds"] >= 2.0   # the budget
    assert vae["train_seconds"] > 0
    assert vae["verifier_pass_rate"] == "n/a"
    saved = json.loads((out / "compare" / "results.json").read_text())
    assert saved["vae"]["fd"] == vae["fd"] and saved["dcgan"]["error"]
    assert (out / "compare" / "table.md").is_file() and (out / "compare" / "compare.png").is_file()
    assert (out / "compare" / "dcgan.error.txt").read_text().count("injected evaluation failure")
    # The evaluated samples went through `ldmflow generate`: a manifest with one row per prompt.
    from pipelines.generate import read_manifest
    assert read_manifest(str(out / "evaluate-vae" / "samples")).num_rows == 8
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    capfd.readouterr()
    rows2 = cmp.compare(cfg)
    err = capfd.readouterr().err
    for stage in ("data", "baseline-vae", "evaluate-vae", "baseline-dcgan"):
        assert f"{stage}: up to date" in err, err[-3000:]
    assert "evaluate-dcgan: no cached output" in err or "evaluate-dcgan: " in err
    assert rows2["vae"] == vae
    dc = rows2["dcgan"]
    assert dc["error"] is None and dc["bpd"] == "n/a" and math.isfinite(dc["fd"])


@pytest.mark.slow
def test_every_family_and_the_ldm_through_compare(tmp_path):
    """The issue's done-when: each family trains, samples and is scored through the pipeline."""
    from pipelines.compare import compare
    families = sorted(TINY)
    cfg = load_config(QUICKSTART, _overrides(tmp_path / "all", families, budget=2.0, ldm=True))
    rows = compare(cfg)
    assert set(rows) == set(families) | {"ldm"}
    failed = {n: r["error"] for n, r in rows.items() if r["error"]}
    assert not failed, failed
    for n, r in rows.items():
        assert math.isfinite(r["fd"]) and r["sample_images_per_s"] > 0, (n, r)
        lik = r["likelihood"] in ("exact", "bound")
        assert (isinstance(r["bpd"], float) and r["bpd"] > 0) == lik, (n, r["bpd"])
    assert isinstance(rows["ldm"]["verifier_pass_rate"], float)
