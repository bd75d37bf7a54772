"""Lineage as a query: from an image, a run or a registered model back to data, configs and code.

`lineage_chain(tracker, target)` follows what the stages record in MLflow — TAG["upstream_runs"]
(the runs that made a stage's inputs), the hashes and model versions in their tags, each run's
config hash and code commit — and returns the chain as a list of `LineageNode`, newest first:

    image -> generation/sample run -> diffusion model version -> latent cache -> text encoder
          -> autoencoder version -> dataset (hash, shards) -> configs -> code commit

`promote(tracker, name, version_or_alias, to_alias)` moves a Model Registry alias.
Kept apart from pipelines.lineage (hash helpers the stages import) so editing this query code does
not change any stage's code hash, hence its cache key.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.tracking import TAG, Tracker

__all__ = ["LineageNode", "LineageError", "lineage_chain", "format_chain", "draw_chain", "promote",
           "resolve_model", "find_output_dir"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
# Where a run sits in the chain (TAG["stage"] value -> order); generation runs (pipelines/generate.py)
# come first, like the pipeline's own sample runs.
STAGE_ORDER = {"generate": 0, "generation": 0, "sample": 1, "diffusion": 2, "cache": 3, "clip": 4,
               "autoencoder": 5, "data": 6}
STAGE_KIND = {"generate": "generation run", "generation": "generation run", "sample": "sample run",
              "diffusion": "diffusion model", "cache": "latent cache", "clip": "text encoder",
              "autoencoder": "autoencoder", "data": "dataset"}
MANIFEST_NAMES = ("manifest.jsonl", "manifest.parquet")


class LineageError(ValueError):
    """The target, run id, model reference or alias is unknown; the message says which."""


@dataclass
class LineageNode:
    kind: str                  # image, generation run, sample run, diffusion model, latent cache, ...
    id: str                    # what identifies it: a path, run id, NAME/VERSION, hash or commit
    label: str                 # one line for people
    run_id: str | None = None  # the MLflow run that made it, if any
    details: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# targets

def resolve_model(tracker: Tracker, uri: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the ModelVersion, or LineageError."""
    from mlflow.exceptions import MlflowException
    m = MODEL_URI.match(uri)
    if not m:
        raise LineageError(f"{uri}: not a model reference (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    name = m["name"]
    _registered(tracker, name)
    try:
        if m["alias"]:
            return tracker.client.get_model_version_by_alias(name, m["alias"])
        return tracker.client.get_model_version(name, m["version"])
    except MlflowException:
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise LineageError(f"{uri}: registered model {name!r} has no {what} "
                           f"({_versions_line(tracker, name)})") from None


def _registered(tracker: Tracker, name: str):
    from mlflow.exceptions import MlflowException
    try:
        return tracker.client.get_registered_model(name)
    except MlflowException:
        known = sorted(r.name for r in tracker.client.search_registered_models())
        raise LineageError(f"unknown registered model {name!r} (known: {', '.join(known) or 'none'})") from None


def _versions_line(tracker: Tracker, name: str) -> str:
    rm = tracker.client.get_registered_model(name)
    versions = sorted((int(v.version) for v in tracker.client.search_model_versions(f"name = '{name}'")))
    aliases = ", ".join(f"{a}->{v}" for a, v in sorted((rm.aliases or {}).items()))
    return f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {aliases or 'none'}"


def find_output_dir(path: str | Path) -> Path | None:
    """The ldmflow run directory (holding pipeline.json) that `path` lies in, if any."""
    p = Path(path).absolute()
    for d in [p, *p.parents]:
        if (d / "pipeline.json").is_file():
            return d
    return None


def _manifest_rows(manifest: Path) -> list[dict]:
    if manifest.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(manifest).to_pylist()
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _row_for_image(image: Path) -> tuple[dict, Path] | None:
    """A manifest row describing `image`: a sidecar <stem>.json, or a manifest in a parent dir whose
    row's relative path (or key) names the file."""
    sidecar = image.with_suffix(".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text()), sidecar
        except json.JSONDecodeError:
            pass
    real = image.resolve()
    for d in list(image.absolute().parents)[:3]:
        for name in MANIFEST_NAMES:
            m = d / name
            if not m.is_file():
                continue
            for row in _manifest_rows(m):
                p = row.get("path")
                if p and (d / p).resolve() == real:
                    return row, m
                if row.get("key") and row["key"] == image.stem:
                    return row, m
    return None


def _row_for_id(ident: str, output_dir: Path | None) -> tuple[dict, Path] | None:
    if output_dir is None:
        return None
    manifests = [output_dir / "samples" / "manifest.jsonl"]
    manifests += sorted(p for name in MANIFEST_NAMES for p in output_dir.rglob(name)
                        if "stages" not in p.relative_to(output_dir).parts)
    for m in dict.fromkeys(manifests):
        if not m.is_file():
            continue
        for row in _manifest_rows(m):
            for k in ("id", "image_id", "prompt_id", "key", "index"):
                if k in row and str(row[k]) == ident:
                    return row, m
    return None


def _image_node(row: dict, where: Path, image: Path | None) -> LineageNode:
    ident = str(image) if image else str(row.get("id") or row.get("prompt_id") or row.get("index"))
    keep = ("prompt", "prompt_id", "id", "index", "seed", "sampler", "steps", "guidance_scale", "guidance",
            "model_version", "diffusion_model_version", "model", "path")
    details = {k: str(row[k]) for k in keep if k in row and row[k] is not None}
    details["manifest"] = str(where)
    return LineageNode("image", ident, f"image {ident} (seed {row.get('seed')}, prompt {row.get('prompt')!r})",
                       None, details)


def _row_run(row: dict) -> str | None:
    for k in ("run_id", "generation_run_id", "mlflow_run_id"):
        if isinstance(row.get(k), str) and RUN_ID.match(row[k]):
            return row[k]
    return None


# ----------------------------------------------------------------------------------------------
# the walk

def _get_run(tracker: Tracker, run_id: str):
    from mlflow.exceptions import MlflowException
    try:
        return tracker.client.get_run(run_id)
    except MlflowException:
        raise LineageError(f"unknown MLflow run {run_id} in {tracker.uri}") from None


def _upstream(run) -> list[str]:
    return [r for r in run.data.tags.get(TAG["upstream_runs"], "").split(",") if RUN_ID.match(r.strip())]


def _model_uris(run) -> list[str]:
    """Registered-model references a run records in its tags or params (a generation run's --model)."""
    vals = list(run.data.tags.values()) + list(run.data.params.values())
    return [v for v in vals if isinstance(v, str) and MODEL_URI.match(v)]


def _stage_runs(tracker: Tracker, start) -> list:
    """`start` and every run upstream of it (breadth first, each once)."""
    seen: dict[str, object] = {}
    todo = [start]
    while todo:
        run = todo.pop(0)
        if run.info.run_id in seen:
            continue
        seen[run.info.run_id] = run
        ups = _upstream(run)
        if not ups:
            for uri in _model_uris(run):
                try:
                    ups.append(resolve_model(tracker, uri).run_id)
                except LineageError:
                    pass
        todo.extend(_get_run(tracker, r) for r in ups if r not in seen)
    return list(seen.values())


def _pipeline_entry(tracker: Tracker, run):
    """A pipeline (parent) run: the lineage starts at the run its samples stage used."""
    try:
        with tempfile.TemporaryDirectory() as d:
            stages = json.loads(Path(tracker.client.download_artifacts(run.info.run_id, "stages.json", d)).read_text())
        for name in ("samples", "diffusion", "cache", "autoencoder", "data"):
            if stages.get(name, {}).get("run_id"):
                return _get_run(tracker, stages[name]["run_id"])
    except Exception:   # runs from before stages.json: its child runs
        pass
    children = tracker.client.search_runs([run.info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    by_stage = {c.data.tags.get(TAG["stage"]): c for c in children}
    for name in ("sample", "diffusion", "cache", "autoencoder", "data"):
        if name in by_stage:
            return by_stage[name]
    return None


def _version_of(tracker: Tracker, run_id: str) -> list:
    try:
        return list(tracker.client.search_model_versions(f"run_id = '{run_id}'"))
    except Exception:
        return []


def _run_node(tracker: Tracker, run) -> LineageNode:
    t = run.data.tags
    stage = t.get(TAG["stage"], "run")
    rid = run.info.run_id
    kind = STAGE_KIND.get(stage, f"{stage} run")
    details = {"run": rid, "run name": run.info.run_name or "", "status": run.info.status}
    for tag in ("dataset_hash", "autoencoder_hash", "text_encoder_hash", "latent_cache_key", "diffusion_hash",
                "stage_key"):
        if t.get(TAG[tag]):
            details[tag] = t[TAG[tag]]
    ident, label = rid, f"{kind}: run {rid}"
    versions = _version_of(tracker, rid)
    if versions:
        mv = tracker.client.get_model_version(versions[0].name, versions[0].version)   # with its aliases
        aliases = list(getattr(mv, "aliases", []) or [])
        details["model"] = f"models:/{mv.name}/{mv.version}" + (f" (aliases: {', '.join(aliases)})" if aliases else "")
        ident = f"{mv.name}/{mv.version}"
    if stage == "diffusion":
        label = f"diffusion model {ident} (hash {t.get(TAG['diffusion_hash'])}, run {rid})"
    elif stage == "cache":
        ident = t.get(TAG["latent_cache_key"], rid)
        label = f"latent cache {ident} (run {rid})"
    elif stage == "clip":
        label = f"text encoder {ident} trained by CLIP (hash {t.get(TAG['text_encoder_hash'])}, run {rid})"
    elif stage == "autoencoder":
        label = f"autoencoder {ident} (hash {t.get(TAG['autoencoder_hash'])}, run {rid})"
    elif stage == "data":
        ident = t.get(TAG["dataset_hash"], rid)
        label = f"dataset {ident} (run {rid})"
        shards = _shards(tracker, rid)
        if shards:
            details["train shards"] = str(len(shards.get("train_urls", [])))
            details["val shards"] = str(len(shards.get("val_urls", [])))
            details["first shard"] = (shards.get("train_urls") or [""])[0]
    elif stage in ("sample", "generate", "generation"):
        label = f"{kind} {rid}"
    return LineageNode(kind, ident, label, rid, details)


def _shards(tracker: Tracker, run_id: str) -> dict | None:
    try:
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(tracker.client.download_artifacts(run_id, "shards.json", d)).read_text())
    except Exception:
        return None


def _text_encoder_node(cache_run) -> LineageNode:
    """No CLIP stage: the cache built its text encoder from cache.text_encoder (random init or
    open_clip pretrained weights), identified by the hash of its directory."""
    h = cache_run.data.tags.get(TAG["text_encoder_hash"], "?")
    return LineageNode("text encoder", h, f"text encoder {h} built from cache.text_encoder (no CLIP stage)",
                       cache_run.info.run_id, {"text_encoder_hash": h})


def lineage_chain(tracker: Tracker, target: str, output_dir: str | Path | None = None) -> list[LineageNode]:
    """The chain behind `target`: an image file, an image id in a manifest under `output_dir`
    (samples/manifest.jsonl, generation manifests), an MLflow run id, or models:/NAME@ALIAS|/VERSION.
    Newest first; ends with the configs and the code commit(s). Unknown targets raise LineageError."""
    out = Path(output_dir) if output_dir else None
    head: list[LineageNode] = []
    start = None
    if target.startswith("models:"):
        start = _get_run(tracker, resolve_model(tracker, target).run_id)
    elif Path(target).is_file():
        image = Path(target)
        found = _row_for_image(image)
        if found is None:
            raise LineageError(f"{target}: no manifest describes this image (looked for {image.stem}.json beside it "
                               f"and {' / '.join(MANIFEST_NAMES)} in its parent directories)")
        row, where = found
        head.append(_image_node(row, where, image))
        start = _start_from_row(tracker, row, target)
    elif RUN_ID.match(target) and _is_run(tracker, target):
        start = _get_run(tracker, target)
    else:
        found = _row_for_id(target, out)
        if found is None:
            where = f"manifests under {out}" if out else "no --output-dir given to look up image ids"
            raise LineageError(f"{target}: unknown target: not an image file, an MLflow run id in {tracker.uri}, "
                               f"a models:/ reference, or an image id ({where})")
        row, where = found
        head.append(_image_node(row, where, None))
        start = _start_from_row(tracker, row, target)
    if TAG["stage"] not in start.data.tags:
        pipeline = start
        start = _pipeline_entry(tracker, pipeline)
        head.append(LineageNode("pipeline run", pipeline.info.run_id, f"pipeline run {pipeline.info.run_id} "
                                f"({pipeline.data.tags.get(TAG['pipeline'], '?')})", pipeline.info.run_id,
                                {"config_hash": pipeline.data.tags.get(TAG["config_hash"], "")}))
        if start is None:
            raise LineageError(f"{pipeline.info.run_id}: a run without ldmflow stage runs to follow")
    runs = sorted(_stage_runs(tracker, start), key=lambda r: STAGE_ORDER.get(r.data.tags.get(TAG["stage"]), 9))
    nodes = [_run_node(tracker, r) for r in runs]
    stages = {r.data.tags.get(TAG["stage"]) for r in runs}
    cache = next((r for r in runs if r.data.tags.get(TAG["stage"]) == "cache"), None)
    if cache is not None and "clip" not in stages:
        at = next(i for i, n in enumerate(nodes) if n.kind == "latent cache") + 1
        nodes.insert(at, _text_encoder_node(cache))
    configs = {r.data.tags.get(TAG["stage"], r.info.run_id): r.data.tags.get(TAG["config_hash"], "?") for r in runs}
    nodes.append(LineageNode("configs", ",".join(f"{s}:{h}" for s, h in configs.items()),
                             "configs: " + ", ".join(f"{s} {h}" for s, h in configs.items()), None,
                             {s: f"config hash {h} (config.json of its run)" for s, h in configs.items()}))
    commits: dict[str, list[str]] = {}
    for r in runs:
        t = r.data.tags
        commit = t.get(TAG["code_commit"]) or _commit_of(t.get(TAG["code_version"], "")) or "unknown"
        commits.setdefault(commit, []).append(t.get(TAG["stage"], r.info.run_id))
    for commit, who in commits.items():
        versions = {r.data.tags.get(TAG["code_version"], "") for r in runs}
        nodes.append(LineageNode("code", commit, f"code commit {commit} ({', '.join(who)})", None,
                                 {"stages": ", ".join(who), "code_version": ", ".join(sorted(v for v in versions if v))}))
    return head + nodes


def _commit_of(version: str) -> str | None:
    return version.split("+g", 1)[1].split(".", 1)[0] if "+g" in version else None


def _is_run(tracker: Tracker, run_id: str) -> bool:
    try:
        _get_run(tracker, run_id)
        return True
    except LineageError:
        return False


def _start_from_row(tracker: Tracker, row: dict, target: str):
    rid = _row_run(row)
    if rid:
        return _get_run(tracker, rid)
    for k in ("model", "model_uri"):
        if isinstance(row.get(k), str) and MODEL_URI.match(row[k]):
            return _get_run(tracker, resolve_model(tracker, row[k]).run_id)
    raise LineageError(f"{target}: its manifest row names no MLflow run (run_id) or models:/ reference")


# ----------------------------------------------------------------------------------------------
# output

def format_chain(nodes: list[LineageNode]) -> str:
    lines = []
    for i, n in enumerate(nodes):
        lines.append(("   " * min(i, 1)) + ("-> " if i else "") + n.label)
        for k, v in n.details.items():
            lines.append(f"{'   ' if i else ''}     {k}: {v}")
    return "\n".join(lines)


def draw_chain(nodes: list[LineageNode], path: str | Path) -> Path:
    """The chain as a PNG: one box per node, top to bottom, arrows between (PIL; no graphviz)."""
    import textwrap
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    width, pad, line_h, gap = 720, 10, 13, 28       # pixels: canvas width, box padding, text line, arrow
    boxes = []
    for n in nodes:
        lines = textwrap.wrap(n.label, 100)[:3] + [f"{k}: {v}"[:110] for k, v in list(n.details.items())[:4]]
        boxes.append((n, lines, len(lines) * line_h + 2 * pad))
    height = sum(h for _, _, h in boxes) + gap * (len(boxes) + 1)
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    y = gap
    for i, (n, lines, h) in enumerate(boxes):
        fill = {"image": "#fde7c8", "code": "#e3e3e3", "configs": "#e3e3e3"}.get(n.kind, "#dcebfa")
        d.rectangle([20, y, width - 20, y + h], outline="black", fill=fill)
        for j, text in enumerate(lines):
            d.text((20 + pad, y + pad + j * line_h), text, fill="black", font=font)
        if i + 1 < len(boxes):
            x = width // 2
            d.line([x, y + h, x, y + h + gap], fill="black", width=2)
            d.polygon([(x - 5, y + h + gap - 8), (x + 5, y + h + gap - 8), (x, y + h + gap)], fill="black")
        y += h + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# registry aliases

def promote(tracker: Tracker, name: str, version_or_alias: str, to_alias: str) -> tuple[str, str | None]:
    """Point alias `to_alias` of registered model `name` at a version (given as a number or as an
    alias it has now, e.g. candidate). Returns (version, version the alias pointed at before)."""
    from mlflow.exceptions import MlflowException
    rm = _registered(tracker, name)
    if not to_alias or to_alias.isdigit():
        raise LineageError(f"--to: expected an alias name such as production, got {to_alias!r}")
    try:
        if version_or_alias.isdigit():
            version = tracker.client.get_model_version(name, version_or_alias).version
        else:
            version = tracker.client.get_model_version_by_alias(name, version_or_alias).version
    except MlflowException:
        what = f"version {version_or_alias}" if version_or_alias.isdigit() else f"alias {version_or_alias!r}"
        raise LineageError(f"registered model {name!r} has no {what} ({_versions_line(tracker, name)})") from None
    before = (rm.aliases or {}).get(to_alias)
    try:
        tracker.client.set_registered_model_alias(name, to_alias, str(version))
    except MlflowException as e:
        raise LineageError(f"--to {to_alias!r}: {e.message if hasattr(e, 'message') else e}") from None
    return str(version), (str(before) if before is not None else None)
