"""Score a finished pipeline run's quality and print a RESULTS.md row.

    python benchmarks/score_samples.py runs/quickstart

- autoencoder: validation PSNR / L1 of reconstructions (logged by the autoencoder stage);
- text alignment (shapes data only): the fraction of samples whose prompt the shapes verifier
  accepts, with colour tolerance (generated pixels are not exact palette colours), overall and per
  caption attribute (colour, shape, size, grid cell);
- timings: each stage's wall time from MLflow.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.datasets import shapes


def attribute_scores(image, caption: str, tolerance: float = 80.0) -> dict[str, bool]:
    """Per-attribute agreement for single-object captions: is there exactly one object, and does
    it have the caption's colour / shape / size / cell?"""
    spec = shapes.parse_caption(caption)
    arr = np.asarray(image.convert("RGB"))
    res = arr.shape[0]
    objs = shapes._objects(arr, tolerance, min_area=max(4, res * res // 200)) or []
    out = {"all": shapes.verify(image, caption, tolerance=tolerance), "one_object": len(objs) == 1}
    if spec["kind"] != "single" or not objs:
        return out
    d = spec["objects"][0]
    o = max(objs, key=lambda o: o["area"])
    sizes = shapes._sizes(res)
    cut = (sizes["small"] + sizes["large"]) / 2
    out.update(color=o["color"] == d["color"], shape=shapes._shape_of(o) == d["shape"],
               size=("small" if o["side"] < cut else "large") == d["size"],
               cell=shapes._cell(o, res) == (d["row"], d["col"]))
    return out


def main(run_dir: str) -> None:
    run = Path(run_dir)
    ae = json.loads((run / "autoencoder" / "artifact.json").read_text())
    rows = [json.loads(l) for l in (run / "samples" / "manifest.jsonl").read_text().splitlines()]
    totals: dict[str, list[bool]] = {}
    for r in rows:
        img = Image.open(run / "samples" / r["path"])
        for k, v in attribute_scores(img, r["prompt"]).items():
            totals.setdefault(k, []).append(v)
    score = {k: float(np.mean(v)) for k, v in totals.items()}
    print(json.dumps({"autoencoder": {k: round(v, 4) for k, v in ae["metrics"].items()},
                      "samples": len(rows), "text_alignment": {k: round(v, 3) for k, v in score.items()}},
                     indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
