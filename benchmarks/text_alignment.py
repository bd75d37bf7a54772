"""Text alignment on held-out compositions, measured with the shapes verifier.

    python benchmarks/text_alignment.py runs/alignment [--per-kind 64] [--guidance 0,1,3,5]

For a finished pipeline run on shapes data with `data.holdout` pairs (colour-shape compositions the
models never saw in training), this draws fresh captions of each kind (single, relation, count):
"held-out" ones that mention a held-out pair, and "seen" ones that do not (new layouts of trained
compositions). It samples each with the run's diffusion model at several guidance scales — scale 0
is the unconditional model (the same network given the empty caption, which caption dropout trained)
and 1 is conditional without guidance — and reports the fraction of images the exact verifier
accepts (colour tolerance 80: generated pixels are not exact palette colours), per caption kind,
plus per-attribute rates for single-object captions. Prints JSON; `--markdown FILE` also writes a
table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.score_samples import attribute_scores  # noqa: E402
from pipelines.datasets.shapes import ShapesSource  # noqa: E402

KINDS = ("single", "relation", "count")


def prompts(cfg: dict, mode: str, per_kind: int, seed: int) -> list[dict]:
    """`per_kind` captions of each kind; mode "only" mentions a held-out pair, "exclude" never does."""
    d = cfg["data"]
    src = ShapesSource(resolution=d["resolution"], seed=seed, max_objects=d["max_objects"],
                       holdout=d["holdout"], holdout_mode=mode)
    got: dict[str, list[str]] = {k: [] for k in KINDS}
    i = 0
    kinds = KINDS if d["max_objects"] >= 2 else ("single",)
    while any(len(got[k]) < per_kind for k in kinds):
        s = src.sample(i)
        i += 1
        if len(got[s.meta["kind"]]) < per_kind:
            got[s.meta["kind"]].append(s.caption)
    return [{"kind": k, "prompt": p} for k in kinds for p in got[k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--per-kind", type=int, default=64)
    ap.add_argument("--guidance", default="0,1,3,5")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--diffusion-dir", default=None,
                    help="a model directory to score instead of the run's final one "
                         "(e.g. from benchmarks/export_diffusion_checkpoint.py)")
    args = ap.parse_args()

    import torch
    from pipelines.sample import PromptSampler

    run = Path(args.run_dir)
    cfg = json.loads((run / "pipeline.json").read_text())["config"]
    if cfg["data"]["source"] != "shapes" or not cfg["data"]["holdout"]:
        sys.exit(f"{run}: needs a shapes run with data.holdout pairs")
    diff = ({"directory": args.diffusion_dir} if args.diffusion_dir
            else json.loads((run / "diffusion" / "artifact.json").read_text()))
    ae = json.loads((run / "autoencoder" / "artifact.json").read_text())
    cache = json.loads((run / "cache" / "artifact.json").read_text())
    sets = {"held-out": prompts(cfg, "only", args.per_kind, args.seed),
            "seen": prompts(cfg, "exclude", args.per_kind, args.seed + 1)}
    torch.set_num_threads(torch.get_num_threads())
    step_file = Path(diff["directory"]) / "step.json"
    results: dict = {"run": str(run), "diffusion_dir": diff["directory"],
                     "trained_steps": json.loads(step_file.read_text())["step"] if step_file.is_file() else None,
                     "holdout": cfg["data"]["holdout"], "steps": args.steps,
                     "per_kind": args.per_kind, "scores": {}}
    for g in [float(x) for x in args.guidance.split(",")]:
        for name, rows in sets.items():
            # A fresh output dir per (guidance, prompt set): the sampler skips indices already on disk.
            with tempfile.TemporaryDirectory() as tmp:
                sampler = PromptSampler(diff["directory"], ae["directory"], cache["text_encoder_dir"],
                                        cache["null_text_file"], cache["scale_factor"], args.steps, g, 0.0,
                                        True, tmp)
                t0 = time.time()
                scores: dict[str, dict[str, list[bool]]] = {}
                for i in range(0, len(rows), args.batch_size):
                    chunk = rows[i:i + args.batch_size]
                    out = sampler({"index": np.arange(i, i + len(chunk)),
                                   "prompt": np.array([r["prompt"] for r in chunk], dtype=object),
                                   "seed": np.arange(i, i + len(chunk)) + args.seed})
                    for r, path in zip(chunk, out["path"]):
                        for attr, ok in attribute_scores(Image.open(path), r["prompt"]).items():
                            scores.setdefault(r["kind"], {}).setdefault(attr, []).append(bool(ok))
                results["scores"][f"{name} g={g:g}"] = {
                    kind: {a: round(float(np.mean(v)), 3) for a, v in attrs.items()}
                    for kind, attrs in scores.items()}
                results["scores"][f"{name} g={g:g}"]["seconds"] = round(time.time() - t0, 1)
                print(f"{name} g={g:g}: " + json.dumps(results["scores"][f"{name} g={g:g}"]), flush=True)
    print(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| prompts | guidance | single | relation | count | single: colour / shape / size / cell |",
             "|---|---|---|---|---|---|"]
    for key, s in results["scores"].items():
        name, g = key.split(" g=")
        single = s.get("single", {})
        attrs = " / ".join(f"{single.get(a, float('nan')):.2f}" for a in ("color", "shape", "size", "cell"))
        cells = [f"{s[k]['all']:.2f}" if k in s else "-" for k in KINDS]
        lines.append(f"| {name} | {g}{' (uncond.)' if float(g) == 0 else ''} | {' | '.join(cells)} | {attrs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
