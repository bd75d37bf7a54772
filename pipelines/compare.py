"""`ldmflow compare CONFIG`: every baseline family and the latent diffusion model trained on the same
data, at the same training CPU budget per worker, scored by the same evaluate stage, in one table.

Each family is two cached stages of the pipeline DAG (pipelines/run.py): `baseline-<family>`
(pipelines/train_baseline.py, `max_cpu_seconds = compare.budget_cpu_seconds`) and `evaluate-<family>`
(pipelines/evaluate.py); the latent diffusion row is the pipeline's own stages plus `evaluate-ldm`.
With `compare.ldm_equal_budget` (the default) the LDM's two training stages share the same budget:
the autoencoder gets `ldm_autoencoder_share` of it and the U-Net the rest, counted the same way
(cluster.train.CpuBudget). Its latent cache is preprocessing, like the baselines' image decoding,
and is not counted.
A rerun recomputes nothing that finished. A family that fails becomes a row with its error and the
comparison goes on: finished rows are written after every row (compare/results.json) and never lost.

Outputs (in the output directory and on the compare MLflow run): compare/table.md, results.json,
compare.png (sample quality vs sampling speed), and a literature-vs-measured check of the
qualitative claims that the four families are usually summarised with.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, PipelineConfig, to_dict
from pipelines.evaluate import NA, EvalTarget
from pipelines.run import STAGES, StageSpec, _claim_output_dir, _context, _say, _stage, _write_json_atomic, preflight
from pipelines.stage import BaselineArtifact, EvaluationArtifact

COMPARE_DIR = "compare"
# What the literature says about each family (the qualitative table the comparison checks).
FAMILY_INFO = {
    "ppca": ("linear Gaussian", "exact"),
    "vae": ("VAE", "bound"),
    "vqvae": ("VQ-VAE + PixelCNN prior", "bound"),
    "pixelcnn": ("autoregressive", "exact"),
    "imagegpt": ("autoregressive", "exact"),
    "dcgan": ("GAN", "none"),
    "stylegan": ("GAN", "none"),
    "glow": ("flow", "exact"),
    "ddpm": ("diffusion (pixels)", "bound"),
    "ldm": ("latent diffusion", "none (latent ELBO)"),
}
COLUMNS = ("fd", "precision", "recall", "bpd", "sample_images_per_s", "train_cpu_seconds", "train_seconds",
           "verifier_pass_rate")


def _baseline_specs(family: str) -> tuple[StageSpec, StageSpec]:
    def run_train(cfg, ctx, a, family=family):
        from pipelines.train_baseline import train_baseline
        return train_baseline(_baseline_cfg(cfg, family), cfg.baseline_model(family), a["data"], ctx,
                              stage_name=f"baseline-{family}")

    def run_eval(cfg, ctx, a, family=family):
        from pipelines.evaluate import evaluate
        art: BaselineArtifact = a[f"baseline-{family}"]
        target = EvalTarget(name=family, model_source=art.directory, model_hash=art.baseline_hash,
                            train_seconds=art.metrics.get("train_seconds"),
                            train_cpu_seconds=art.metrics.get("train_cpu_seconds"), baseline_dir=art.directory)
        return evaluate(cfg.evaluate, target, a["data"], ctx, stage_name=f"evaluate-{family}")

    train = StageSpec(f"baseline-{family}", f"baseline-{family}", "pipelines.train_baseline", BaselineArtifact,
                      ("data",), "baseline_hash", run_train)
    ev = StageSpec(f"evaluate-{family}", f"evaluate-{family}", "pipelines.evaluate", EvaluationArtifact,
                   ("data", f"baseline-{family}"), None, run_eval)
    return train, ev


def _baseline_cfg(cfg: PipelineConfig, family: str):
    """The baseline stage config of one family in the comparison: the shared settings, its batch,
    and the wall-time budget instead of a step count."""
    c = cfg.compare
    own = cfg.compare.models.get(family, cfg.baseline.model if family == cfg.baseline.family else {})
    return dataclasses.replace(cfg.baseline, family=family, model=own,
                               batch_size=c.batch_size.get(family, cfg.baseline.batch_size),
                               max_steps=10 ** 9, max_cpu_seconds=c.budget_cpu_seconds)


def with_ldm_budget(cfg: PipelineConfig) -> PipelineConfig:
    """The config whose LDM stages train on the comparison's CPU budget (compare.ldm_equal_budget):
    autoencoder and U-Net each get their share as max_cpu_seconds, and no step limit."""
    c = cfg.compare
    if not (c.include_ldm and c.ldm_equal_budget):
        return cfg
    if cfg.clip.enabled:
        raise ConfigError("clip.enabled: the clip stage has no CPU budget; turn it off or set "
                          "compare.ldm_equal_budget false")
    ae_s = c.budget_cpu_seconds * c.ldm_autoencoder_share
    return dataclasses.replace(
        cfg, autoencoder=dataclasses.replace(cfg.autoencoder, max_steps=10 ** 9, max_cpu_seconds=ae_s),
        diffusion=dataclasses.replace(cfg.diffusion, max_steps=10 ** 9,
                                      max_cpu_seconds=c.budget_cpu_seconds - ae_s))


def _ldm_eval_spec(ldm_train_seconds: float, ldm_train_cpu_seconds: float | None) -> StageSpec:
    def run_eval(cfg, ctx, a):
        from pipelines.evaluate import evaluate
        from pipelines.pyfunc import bundle_from_pipeline
        bundle = bundle_from_pipeline(ctx.output_dir)
        target = EvalTarget(name="ldm", model_source=str(ctx.output_dir), model_hash=bundle.content_hash(),
                            train_seconds=ldm_train_seconds, train_cpu_seconds=ldm_train_cpu_seconds,
                            text_conditional=True)
        return evaluate(cfg.evaluate, target, a["data"], ctx, stage_name="evaluate-ldm")
    return StageSpec("evaluate-ldm", "evaluate-ldm", "pipelines.evaluate", EvaluationArtifact,
                     ("data", "diffusion"), None, run_eval)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or v == NA:
        return "n/a"
    if isinstance(v, str):
        return v
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _row(name: str, metrics: dict | None = None, error: str | None = None, steps: Any = None) -> dict:
    kind, lik = FAMILY_INFO.get(name, ("?", "?"))
    row = {"model": name, "kind": kind, "likelihood": lik, "steps": steps, "error": error}
    for c in COLUMNS:
        row[c] = (metrics or {}).get(c, NA)
    return row


def literature_checks(rows: dict[str, dict]) -> list[dict]:
    """The usual qualitative claims, checked against the measured rows: [{claim, measured, agrees}]."""
    ok = {n: r for n, r in rows.items() if not r.get("error")}

    def num(n, k):
        v = ok.get(n, {}).get(k)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    checks = []

    def add(claim, groups, key, test, what):
        """`groups`: tuples of model names; the claim is checked only when every group has a row."""
        have = {n: v for g in groups for n in g if (v := num(n, key)) is not None}
        if not all(any(n in have for n in g) for g in groups):
            checks.append({"claim": claim, "measured": "not enough rows", "agrees": "n/a"})
            return
        measured = ", ".join(f"{n} {_fmt(v)}" for n, v in sorted(have.items(), key=lambda kv: kv[1]))
        checks.append({"claim": claim, "measured": f"{what}: {measured}", "agrees": "yes" if test(have) else "no"})

    fast, slow = ("vae", "dcgan", "stylegan", "glow", "ppca"), ("pixelcnn", "imagegpt", "ddpm")
    add("Autoregressive and diffusion models sample slowest; VAEs, GANs and flows in one pass",
        (fast, slow), "sample_images_per_s",
        lambda h: max(h[n] for n in slow if n in h) < min(h[n] for n in fast if n in h), "images/s")
    gans = ("dcgan", "stylegan")
    add("GANs' samples are sharper than VAEs' (lower FD)", (("vae",), gans), "fd",
        lambda h: min(h[n] for n in gans if n in h) < h["vae"], "FD")
    diffusion = ("ddpm", "ldm")
    others = tuple(n for n in FAMILY_INFO if n not in diffusion)
    add("Diffusion gives the best sample quality (lowest FD)", (diffusion, others), "fd",
        lambda h: min(h, key=h.get) in diffusion, "FD")
    exact = ("pixelcnn", "imagegpt", "glow")
    add("Autoregressive models and flows reach better likelihoods than the VAE bound", (("vae",), exact), "bpd",
        lambda h: all(h[n] < h["vae"] for n in exact if n in h), "bits/dim")
    add("The pixel-space PixelCNN beats a linear Gaussian (PPCA) in likelihood", (("ppca",), ("pixelcnn",)), "bpd",
        lambda h: h["pixelcnn"] < h["ppca"], "bits/dim")
    return checks


def render_table(rows: dict[str, dict], cfg: PipelineConfig) -> str:
    feats = "EfficientNet-Lite0" if cfg.evaluate.features == "efficientnet_lite0" else "InceptionV3"
    c = cfg.compare
    ldm = ("" if not c.include_ldm else
           f" and for the LDM's autoencoder + U-Net together ({c.ldm_autoencoder_share:.0%} / "
           f"{1 - c.ldm_autoencoder_share:.0%}; its latent cache, like image decoding, not counted)"
           if c.ldm_equal_budget else "; the LDM row runs its own step counts")
    lines = [f"Data: {cfg.data.source} at {cfg.data.resolution}x{cfg.data.resolution}; training budget "
             f"{cfg.compare.budget_cpu_seconds:.0f} CPU seconds per training worker "
             f"({cfg.baseline.num_workers} workers) for each baseline{ldm}; {cfg.evaluate.num_samples} samples "
             f"per model against the held-out images. FD on {feats} features"
             + (" (NOT comparable to Inception FID)" if feats != "InceptionV3" else "") + ".", "",
             "| model | kind | likelihood | steps | FD | precision | recall | bits/dim | sample img/s | "
             "train CPU s/worker | train wall s | verifier |", "|" + "---|" * 12]
    for name, r in rows.items():
        if r.get("error"):
            lines.append(f"| {name} | {r['kind']} | {r['likelihood']} | - | failed: {r['error'][:120]} |"
                         + " |" * 7)
            continue
        lines.append(f"| {name} | {r['kind']} | {r['likelihood']} | {_fmt(r.get('steps'))} | {_fmt(r['fd'])} | "
                     f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['bpd'])} | "
                     f"{_fmt(r['sample_images_per_s'])} | {_fmt(r['train_cpu_seconds'])} | {_fmt(r['train_seconds'])} | "
                     f"{_fmt(r['verifier_pass_rate'])} |")
    lines += ["", "| the literature says | measured | agrees |", "|---|---|---|"]
    for c in literature_checks(rows):
        lines.append(f"| {c['claim']} | {c['measured']} | {c['agrees']} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> Path | None:
    """FD against sampling images/s (log scale), one labelled point per scored model."""
    pts = [(n, r["sample_images_per_s"], r["fd"]) for n, r in rows.items()
           if not r.get("error") and all(isinstance(r[k], (int, float)) for k in ("sample_images_per_s", "fd"))]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for n, x, y in pts:
        ax.scatter([x], [y])
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("sampling images/s (log)")
    ax.set_ylabel("FD (lower is better)")
    ax.set_title("sample quality vs sampling speed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(cfg: PipelineConfig, address: str | None = None, force: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run the comparison (see the module docstring); returns {model: row}."""
    from cluster.runtime import ray_session, worker_env
    cfg = with_ldm_budget(cfg)
    preflight(cfg, with_samples=cfg.compare.include_ldm)
    out = Path(cfg.output_dir).resolve()
    with ray_session(address or cfg.cluster.address, cfg.cluster.num_cpus,
                     worker_env(cfg.cluster.torch_extensions_dir)):
        resumed = _claim_output_dir(cfg, out)
        ctx = _context(cfg, out, resumed)
        cdir = out / COMPARE_DIR
        cdir.mkdir(exist_ok=True)
        results = cdir / "results.json"
        rows: dict[str, dict] = {}
        ok = False
        try:
            specs: dict[str, StageSpec] = dict(STAGES)
            arts: dict[str, Any] = {}
            arts["data"], _ = _stage(ctx, STAGES["data"], arts, "data" in force)

            def save():
                _write_json_atomic(results, rows)
                (cdir / "table.md").write_text(render_table(rows, cfg))

            for family in cfg.compare.families:
                train, ev = _baseline_specs(family)
                specs.update({train.name: train, ev.name: ev})
                try:
                    sc = {"baseline": to_dict(_baseline_cfg(cfg, family)), "model": cfg.baseline_model(family)}
                    arts[train.name], _ = _stage(ctx, train, arts, train.name in force, specs, sc)
                    arts[ev.name], _ = _stage(ctx, ev, arts, ev.name in force or train.name in force, specs,
                                              {"evaluate": to_dict(cfg.evaluate), "data": to_dict(cfg.data)})
                    tm = arts[train.name].metrics
                    rows[family] = _row(family, arts[ev.name].metrics,
                                        steps="closed form" if tm.get("closed_form") else tm.get("step"))
                except Exception as e:   # noqa: BLE001 - one family's failure is a row, not the end
                    _say(f"compare: {family} failed: {type(e).__name__}: {e}")
                    (cdir / f"{family}.error.txt").write_text(traceback.format_exc())
                    rows[family] = _row(family, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                save()
            if cfg.compare.include_ldm:
                try:
                    seconds = 0.0
                    for name in [n for n in STAGES if n != "data" and (n != "clip" or cfg.clip.enabled)]:
                        arts[name], info = _stage(ctx, STAGES[name], arts, name in force)
                        if name in ("autoencoder", "clip", "cache", "diffusion"):
                            seconds += info.get("seconds") or 0.0
                    # CPU seconds per worker of the two training stages, counted as the baselines' are.
                    cpu = [arts[n].metrics.get("train_cpu_seconds") for n in ("autoencoder", "diffusion")]
                    ev = _ldm_eval_spec(seconds, sum(cpu) if None not in cpu else None)
                    specs[ev.name] = ev
                    arts[ev.name], _ = _stage(ctx, ev, arts, ev.name in force, specs,
                                              {"evaluate": to_dict(cfg.evaluate), "data": to_dict(cfg.data),
                                               "sample": to_dict(cfg.sample)})
                    steps = (f"AE {int(arts['autoencoder'].metrics['step'])} + "
                             f"U-Net {int(arts['diffusion'].metrics['step'])}")
                    rows["ldm"] = _row("ldm", arts[ev.name].metrics, steps=steps)
                except Exception as e:   # noqa: BLE001
                    _say(f"compare: ldm failed: {type(e).__name__}: {e}")
                    (cdir / "ldm.error.txt").write_text(traceback.format_exc())
                    rows["ldm"] = _row("ldm", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                save()
            save()
            png = plot(rows, cdir / "compare.png")
            ctx.tracker.log_artifact(ctx.pipeline_run_id, cdir / "table.md", COMPARE_DIR)
            ctx.tracker.log_artifact(ctx.pipeline_run_id, results, COMPARE_DIR)
            if png:
                ctx.tracker.log_artifact(ctx.pipeline_run_id, png, COMPARE_DIR)
            ctx.tracker.set_tags(ctx.pipeline_run_id, {"ldmflow.compare": ",".join(rows),
                                                       "ldmflow.compare_failed": ",".join(
                                                           n for n, r in rows.items() if r.get("error"))})
            _say(f"compare: table in {cdir / 'table.md'} ({time.strftime('%H:%M:%S')})")
            ok = True
            return rows
        finally:
            ctx.tracker.end_run(ctx.pipeline_run_id, ok=ok)
