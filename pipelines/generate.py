"""`ldmflow generate`: batch generation over a prompts file, deterministic and exactly once.

Prompt ids. A .jsonl row's "id" (any JSON scalar, as a string) or a .parquet "id" column, when
present; otherwise the prompt's 1-based line number (.txt, .jsonl) or 0-based row number (.parquet),
as a string. Blank lines are not prompts but count as lines. Each image's seed is
`derive_seed(id, seed)` (pipelines/pyfunc.py): a hash, independent of batches and shards.

Bad lines (not JSON, no string "prompt", invalid UTF-8, an id seen before) are reported with their
line numbers. `--on-bad-line skip` (default) generates the rest and lists them in the summary and
`bad_lines.json`; `stop` refuses before anything is written.

Commit protocol (exactly once). The prompts are read twice through Ray Data, streamed (a custom
line datasource for .txt/.jsonl that keeps line numbers, read_parquet for .parquet):
 1. a scan: validates, counts and fingerprints the prompts; nothing is written yet.
 2. the valid prompts, in file order, are numbered 0..N-1 and cut into fixed chunks of
    `shard_size` (chunk k = numbers [k*S, (k+1)*S)). Each chunk is sampled by one actor in fixed
    sub-batches of `batch_size` (so every image's batch is a function of the job), and committed as
    `shards/{k:06d}.tar` (WebDataset: {key}.png + {key}.json) then `manifest/{k:06d}.parquet`, each
    written under a temporary name and renamed. A chunk is done iff its manifest part exists; a
    restart skips done chunks and regenerates the others (a shard without its part is overwritten
    with the same bytes). At the end `manifest.parquet` is rebuilt from the parts and checked: N rows,
    every id once.
`job.json` holds the job's fingerprint (model content hash, prompts hash, resolved settings,
batch_size, shard_size, on_bad_line); an --out holding another job's fingerprint, or anything but a
generate job, is refused before anything is written. --out is any fsspec URL (local paths too).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipelines.pyfunc import ModelBundle, SamplerSettings, derive_seed

__all__ = ["GenerateConfig", "GenerateResult", "GenerateError", "ModelRefError", "ResolvedModel",
           "generate", "resolve_model", "regenerate", "read_manifest"]

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
BAD_LINES_FILE = "bad_lines.json"
MANIFEST_FILE = "manifest.parquet"
SHARDS_DIR, PARTS_DIR = "shards", "manifest"
TMP_PREFIX = ".tmp-"                # temporary names; never read, removed when a job (re)starts
READ_BLOCK_LINES = 4096             # prompt lines per Ray Data block
BAD_LINES_KEPT = 1000               # bad lines listed in bad_lines.json (all are counted)
GRID_IMAGES = 16                    # images in the summary grid logged to MLflow
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}


class GenerateError(ValueError):
    """Bad input to a generation job (prompts, --out, settings); nothing was written."""


class ModelRefError(GenerateError):
    """--model names no model that can be sampled."""


@dataclass
class GenerateConfig:
    model: str                      # models:/NAME@ALIAS, models:/NAME/VERSION, or a local pipeline/bundle dir
    prompts: str                    # .txt / .jsonl / .parquet, a path or fsspec URL
    out: str                        # a directory or fsspec URL
    batch_size: int = 16            # images per sampler call (part of the job: it fixes batch composition)
    concurrency: int = 1            # sampler actors (each holds the model once)
    shard_size: int = 1000          # prompts per chunk = per shard (the commit unit)
    on_bad_line: str = "skip"       # skip | stop
    sampler: str | None = None      # None: the model's own settings (bundle.json)
    spacing: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    resolution: int | None = None
    seed: int | None = None
    precision: str | None = None    # fp32 | bf16 U-Net (None: the model's setting)
    compile: bool | None = None     # torch.compile the U-Net in each actor
    use_gpu: bool = False
    tracking_uri: str | None = None  # registry + where the generation run is logged
    experiment: str = "generate"
    progress: bool = True           # a progress bar on stderr
    # test hook: "tmp_shard:K" / "shard:K" kills the actor there (chunk K); "stall:K" makes chunk K
    # wait an hour before sampling, so a test can kill the job at a known point
    fault: str = ""

    def __post_init__(self):
        for name in ("batch_size", "concurrency", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GenerateError(f"{name}: expected an int >= 1, got {v!r}")
        if self.on_bad_line not in ("skip", "stop"):
            raise GenerateError(f"on_bad_line: expected skip or stop, got {self.on_bad_line!r}")
        if not self.model:
            raise ModelRefError("model: required (models:/NAME@ALIAS, models:/NAME/VERSION or a directory)")
        if not self.prompts:
            raise GenerateError("prompts: required")
        if prompts_format(self.prompts) is None:
            raise GenerateError(f"prompts: expected a .txt, .jsonl or .parquet file, got {self.prompts!r}")
        if not self.out:
            raise GenerateError("out: required")

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sampler", "spacing", "steps", "guidance_scale", "eta",
                                              "resolution", "seed", "precision", "compile")}


@dataclass
class GenerateResult:
    out: str
    num_images: int                 # images in the manifest (all chunks)
    num_generated: int              # made by this call (the rest were committed before)
    seconds: float
    images_per_s: float             # of this call's generation
    num_bad_lines: int
    manifest: str
    run_id: str | None = None
    bad_lines: list[dict] = field(default_factory=list)
    num_actors: int = 0             # sampler actors this call ran (concurrency, or fewer if CPUs lacked)


def prompts_format(path: str) -> str | None:
    return FORMATS.get(os.path.splitext(path.split("?", 1)[0])[1].lower())


# ----------------------------------------------------------------------------------------------
# model references


@dataclass
class ResolvedModel:
    ref: str                        # as given
    source: str                     # what an actor loads: a local directory, or a pinned models:/NAME/VERSION
    tracking_uri: str | None
    bundle: ModelBundle             # materialised on this machine
    name: str | None = None         # registered name and version, for registry refs
    version: str | None = None
    run_id: str | None = None

    def describe(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else self.source


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    body = ref[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ModelRefError(f"model: {ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")


def _registry_version(ref: str, uri: str | None):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    if not uri:
        raise ModelRefError(f"model: {ref} is a registry reference; give --tracking-uri (or set "
                            f"MLFLOW_TRACKING_URI) to say which MLflow to ask")
    name, version, alias = _parse_ref(ref)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
    except MlflowException as e:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelRefError(f"model: {ref}: no registered model {name!r} with {what} in {uri} "
                            f"({str(e).splitlines()[0][:200]})") from None
    return client, mv


def _bundle_in(directory: Path) -> ModelBundle | None:
    """A bundle dir, a saved pyfunc (artifacts/bundle), or a finished pipeline output dir."""
    from pipelines.pyfunc import BUNDLE_FILE, BaselineBundle, bundle_from_pipeline
    for d in (directory, directory / "baseline", directory / "model"):
        if BaselineBundle.is_baseline_dir(d):   # a baseline family's model (train_baseline)
            return BaselineBundle(model_dir=str(d.resolve()))
    if (directory / BUNDLE_FILE).is_file():
        return ModelBundle.from_dir(directory)
    if (directory / "artifacts" / "bundle" / BUNDLE_FILE).is_file():
        return ModelBundle.from_dir(directory / "artifacts" / "bundle")
    if (directory / "diffusion" / "artifact.json").is_file():
        return bundle_from_pipeline(directory)
    return None


def resolve_model(ref: str, tracking_uri: str | None = None, download_dir: str | None = None) -> ResolvedModel:
    """--model to a bundle on this machine. Registry refs must name a pipeline model logged by
    `log_pipeline_model`, or a version (e.g. the U-Net's) tagged with the pipeline model it belongs
    to; aliases are pinned to the version they point at now."""
    from pipelines.pyfunc import KIND_TAG, PIPELINE_MODEL_TAG
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not ref.startswith("models:/"):
        d = Path(ref).expanduser()
        if not d.is_dir():
            raise ModelRefError(f"model: {ref!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a directory")
        try:
            bundle = _bundle_in(d)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ModelRefError(f"model: {ref}: {e}") from None
        if bundle is None:
            raise ModelRefError(f"model: {ref} holds no model bundle, pyfunc model or finished pipeline "
                                f"(diffusion/artifact.json)")
        if uri is None and (d / "mlflow.db").is_file():
            uri = f"sqlite:///{(d / 'mlflow.db').resolve()}"
        return ResolvedModel(ref=ref, source=str(d.resolve()), tracking_uri=uri, bundle=bundle)
    client, mv = _registry_version(ref, uri)
    tags = dict(mv.tags or {})
    if tags.get(KIND_TAG) not in ("pipeline", "baseline"):
        target = tags.get(PIPELINE_MODEL_TAG)
        if not target:
            raise ModelRefError(f"model: {ref} (models:/{mv.name}/{mv.version}) is not an ldmflow pipeline model "
                                f"and no pipeline model was logged for it; log one with "
                                f"pipelines.pyfunc.log_pipeline_model and pass its reference")
        client, mv = _registry_version(target, uri)
    import mlflow.artifacts
    import tempfile
    dst = download_dir or tempfile.mkdtemp(prefix="ldmflow-model-")
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=uri, dst_path=dst)
    bundle = _bundle_in(Path(local))
    if bundle is None:
        raise ModelRefError(f"model: models:/{mv.name}/{mv.version}: its artifacts ({mv.source}) hold no "
                            f"ldmflow bundle")
    return ResolvedModel(ref=ref, source=f"models:/{mv.name}/{mv.version}", tracking_uri=uri, bundle=bundle,
                         name=mv.name, version=str(mv.version), run_id=mv.run_id)


# ----------------------------------------------------------------------------------------------
# prompts, streamed through Ray Data


def _line_datasource(fmt: str):
    """A Ray Data file datasource streaming .txt/.jsonl lines with their line numbers, parsed into
    rows {pos (line), id, prompt, error}. Ray's read_text reads a whole file into one block and
    drops line numbers; this reads 1 MiB at a time and yields blocks of READ_BLOCK_LINES."""
    from ray.data.datasource import FileBasedDatasource

    class PromptLines(FileBasedDatasource):
        def _read_stream(self, f, path: str) -> Iterator[Any]:
            import pyarrow as pa
            rows: dict[str, list] = {"pos": [], "id": [], "prompt": [], "error": []}
            n, rest = 0, b""
            while True:
                chunk = f.read(1 << 20)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop() if chunk else b""
                for raw in lines:
                    n += 1
                    item = _parse_line(raw, n, fmt)
                    if item is not None:
                        for k in rows:
                            rows[k].append(item[k])
                    if len(rows["pos"]) >= READ_BLOCK_LINES:
                        yield pa.table(rows)
                        rows = {k: [] for k in rows}
                if not chunk:
                    break
            if rows["pos"]:
                yield pa.table(rows)

    return PromptLines


def _parse_line(raw: bytes, n: int, fmt: str) -> dict | None:
    """One line -> a row (error "" when fine), or None for a blank line."""
    row = {"pos": n, "id": str(n), "prompt": "", "error": ""}
    try:
        text = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        return {**row, "error": f"not UTF-8 ({e.reason} at byte {e.start})"}
    if not text.strip():
        return None
    if fmt == "txt":
        return {**row, "prompt": text.strip()}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return {**row, "error": f"not JSON ({e.msg})"}
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        return {**row, "error": 'expected an object with a string "prompt"'}
    pid = obj.get("id")
    if pid is not None and not isinstance(pid, (str, int)) or isinstance(pid, bool) or pid == "":
        return {**row, "error": '"id" must be a non-empty string or an integer'}
    return {**row, "id": str(pid) if pid is not None else str(n), "prompt": obj["prompt"]}


def _filesystem(url: str):
    """(pyarrow filesystem or None, path) for Ray Data readers; fsspec URLs go through fsspec."""
    if "://" not in url or url.startswith("file://"):
        return None, os.path.abspath(url.removeprefix("file://"))
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    fs, path = fsspec.core.url_to_fs(url)
    return PyFileSystem(FSSpecHandler(fs)), path


# Reading prompts is light I/O: its Ray tasks reserve no CPU, so the sampler actors (1 CPU each, for
# the whole job) can have every CPU without starving the read that feeds the driver.
READ_TASK_ARGS = {"num_cpus": 0}


def _prompt_batches(path: str) -> Iterator[dict[str, np.ndarray]]:
    """Batches {pos, id, prompt, error} in file order, streamed through Ray Data."""
    import ray.data
    fmt = prompts_format(path)
    fs, p = _filesystem(path)
    if fs is None and not os.path.isfile(p):
        raise GenerateError(f"prompts: file not found: {path}")
    if fs is not None and not fs.get_file_info(p).is_file:
        raise GenerateError(f"prompts: file not found: {path}")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        schema = pq.read_schema(p, filesystem=fs) if fs else pq.read_schema(p)
        if "prompt" not in schema.names:
            raise GenerateError(f"prompts: {path} has no 'prompt' column (columns: {', '.join(schema.names)})")
        cols = ["prompt"] + (["id"] if "id" in schema.names else [])
        ds = ray.data.read_parquet(p, columns=cols, filesystem=fs, ray_remote_args=READ_TASK_ARGS)
    else:
        ds = ray.data.read_datasource(_line_datasource(fmt)(p, filesystem=fs), ray_remote_args=READ_TASK_ARGS)
    ds.context.execution_options.preserve_order = True   # positions and chunks follow the file
    ds.context.enable_progress_bars = False
    row = 0
    for batch in ds.iter_batches(batch_size=READ_BLOCK_LINES, batch_format="numpy"):
        if fmt != "parquet":
            yield batch
            continue
        n = len(batch["prompt"])
        pos = np.arange(row, row + n)
        row += n
        prompts = batch["prompt"]
        ok = np.array([isinstance(x, str) and bool(x.strip()) for x in prompts])
        ids = (np.array([str(v) if v is not None else "" for v in batch["id"]], dtype=object)
               if "id" in batch else np.array([str(i) for i in pos], dtype=object))
        err = np.where(ok, "", "prompt is null, empty or not a string").astype(object)
        err = np.where((ids == "") & ok, "id is null or empty", err)
        yield {"pos": pos, "id": ids, "prompt": np.where(ok, prompts, "").astype(object), "error": err}


def _id_hash(ids: np.ndarray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big")
                     for i in ids], dtype=np.uint64)


@dataclass
class _Scan:
    num_valid: int
    skip: set[int]                  # positions not generated: bad lines and repeated ids
    bad: list[dict]                 # {"line", "error"} (first BAD_LINES_KEPT)
    num_bad: int
    sha: str


def _scan(path: str) -> _Scan:
    """Pass 1: validate, count, fingerprint; memory is 16 bytes per prompt (id hash + position)."""
    h = hashlib.sha256()
    bad: list[dict] = []
    num_bad = 0
    skip: set[int] = set()
    hashes, positions = [], []
    for b in _prompt_batches(path):
        for pos, pid, prompt, err in zip(b["pos"], b["id"], b["prompt"], b["error"]):
            h.update(f"{pos}\x00{pid}\x00{prompt}\x00{err}\x01".encode())
            if err:
                num_bad += 1
                skip.add(int(pos))
                if len(bad) < BAD_LINES_KEPT:
                    bad.append({"line": int(pos), "error": str(err)})
        good = np.array([not e for e in b["error"]], dtype=bool)
        hashes.append(_id_hash(b["id"][good]))
        positions.append(np.asarray(b["pos"], dtype=np.int64)[good])
    hs = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    ps = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    order = np.lexsort((ps, hs))                       # by id hash, then position
    hs, ps = hs[order], ps[order]
    dup = np.nonzero(hs[1:] == hs[:-1])[0] + 1         # every occurrence after the first
    first = {}
    for i in dup:
        j = i
        while j > 0 and hs[j - 1] == hs[i]:
            j -= 1
        first[int(ps[i])] = int(ps[j])
    for pos in sorted(first):
        num_bad += 1
        skip.add(pos)
        if len(bad) < BAD_LINES_KEPT:
            bad.append({"line": pos, "error": f"repeated id (first at line {first[pos]})"})
    bad.sort(key=lambda r: r["line"])
    return _Scan(num_valid=len(hs) - len(dup), skip=skip, bad=bad, num_bad=num_bad, sha=h.hexdigest()[:16])


# ----------------------------------------------------------------------------------------------
# output directory (fsspec)


class _Out:
    def __init__(self, url: str):
        import fsspec
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write under a temporary name, then rename: a reader sees all of it or nothing (on object
        stores the final PUT is atomic by itself)."""
        final = self.path(rel)
        parent, name = final.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def read(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def ls(self, rel: str) -> list[str]:
        p = self.path(rel)
        if not self.fs.isdir(p):
            return []
        return sorted(x.rsplit("/", 1)[-1] for x in self.fs.ls(p, detail=False))


def _claim(out: _Out, job: dict) -> bool:
    """Create or re-enter --out for `job`; True when resuming. Refuses another job's results."""
    if out.exists(JOB_FILE):
        try:
            other = json.loads(out.read(JOB_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GenerateError(f"out: {out.url}/{JOB_FILE} is unreadable; not safe to reuse") from None
        if other.get("fingerprint") != job["fingerprint"]:
            diff = [k for k in ("model", "prompts", "settings") if other.get("parts", {}).get(k) != job["parts"][k]]
            raise GenerateError(
                f"out: {out.url} holds another generation job (fingerprint {other.get('fingerprint')}, this "
                f"job {job['fingerprint']}; differs in: {', '.join(diff) or 'fingerprint'}). Nothing was "
                f"changed. Choose another --out, or rerun with the job's own arguments to resume it.")
        return True
    if out.fs.exists(out.root) and out.fs.isdir(out.root) and out.fs.ls(out.root, detail=False):
        raise GenerateError(f"out: {out.url} is not empty and holds no {JOB_FILE}: not a generation job's "
                            f"output. Nothing was changed. Choose an empty or new directory.")
    out.write_atomic(JOB_FILE, json.dumps(job, indent=2, sort_keys=True).encode())
    return False


def _clean_tmp(out: _Out) -> None:
    for sub in ("", SHARDS_DIR, PARTS_DIR):
        for name in out.ls(sub):
            if name.startswith(TMP_PREFIX):
                out.fs.rm(out.path(sub, name) if sub else out.path(name))


def _done_chunks(out: _Out) -> set[int]:
    return {int(n.split(".")[0]) for n in out.ls(PARTS_DIR) if n.endswith(".parquet") and not n.startswith(".")}


# ----------------------------------------------------------------------------------------------
# the actor


def _materialize(source: str, tracking_uri: str | None) -> ModelBundle:
    return resolve_model(source, tracking_uri).bundle


class ChunkWriter:
    """A Ray actor: the model loaded once; `run(chunk, rows)` samples one chunk in fixed
    sub-batches and commits its shard, then its manifest part."""

    def __init__(self, source: str, tracking_uri: str | None, settings: dict, out: str, job_meta: dict,
                 batch_size: int, fault: str = ""):
        import torch
        from pipelines.pyfunc import make_sampler
        if not torch.cuda.is_available():
            torch.set_num_threads(1)   # one CPU per actor; regenerate() uses the same count
        self.sampler = make_sampler(_materialize(source, tracking_uri), SamplerSettings.from_dict(settings))
        self.out = _Out(out)
        self.meta = job_meta
        self.batch_size = batch_size
        self.fault = fault

    def ready(self) -> bool:
        return True

    def run(self, chunk: int, rows: dict[str, list], previews: int = 0) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from webdataset.writer import TarWriter
        from pipelines.pyfunc import png_bytes
        t0 = time.time()
        if self.fault == f"stall:{chunk}":
            time.sleep(3600)
        s = self.sampler.settings
        n = len(rows["id"])
        seeds = [derive_seed(i, s.seed) for i in rows["id"]]
        buf = io.BytesIO()
        writer = TarWriter(buf, encoder=False, mtime=0.0)   # fixed mtimes: same samples, same bytes
        manifest = {k: [] for k in ("id", "prompt", "seed", "line", "ordinal", "key", "shard", "chunk", "batch",
                                    "png_sha256")}
        shown = []
        shard = f"{SHARDS_DIR}/{chunk:06d}.tar"
        for b0 in range(0, n, self.batch_size):
            sl = slice(b0, b0 + self.batch_size)
            images = self.sampler.sample(rows["prompt"][sl], seeds[sl])
            for j, img in enumerate(images, start=b0):
                png = png_bytes(img)
                key = f"{rows['ordinal'][j]:09d}"   # WebDataset keys may not hold dots; ids may
                meta = {"id": rows["id"][j], "prompt": rows["prompt"][j], "seed": seeds[j], "line": rows["pos"][j],
                        "batch": b0 // self.batch_size, "chunk": chunk, **self.meta}
                writer.write({"__key__": key, "png": png, "json": json.dumps(meta, sort_keys=True).encode()})
                for k, v in (("id", rows["id"][j]), ("prompt", rows["prompt"][j]), ("seed", seeds[j]),
                             ("line", rows["pos"][j]), ("ordinal", rows["ordinal"][j]), ("key", key),
                             ("shard", shard), ("chunk", chunk), ("batch", b0 // self.batch_size),
                             ("png_sha256", hashlib.sha256(png).hexdigest())):
                    manifest[k].append(v)
                if len(shown) < previews:
                    shown.append((png, rows["prompt"][j]))
        writer.close()
        if self.fault == f"tmp_shard:{chunk}":   # a crash with the shard half-committed
            self.out.fs.pipe(self.out.path(SHARDS_DIR, f"{TMP_PREFIX}{chunk:06d}.tar.dead"), buf.getvalue()[:512])
            os._exit(1)
        self.out.write_atomic(shard, buf.getvalue())
        if self.fault == f"shard:{chunk}":       # a crash between the shard and its manifest part
            os._exit(1)
        part = io.BytesIO()
        pq.write_table(pa.table(manifest), part)
        self.out.write_atomic(f"{PARTS_DIR}/{chunk:06d}.parquet", part.getvalue())   # the commit
        return {"chunk": chunk, "count": n, "seconds": time.time() - t0, "previews": shown}


# ----------------------------------------------------------------------------------------------
# the driver


def _chunks(path: str, scan: _Scan, shard_size: int, done: set[int]) -> Iterator[tuple[int, dict]]:
    """Pass 2: valid prompts numbered in file order, grouped into chunks; done chunks dropped."""
    ordinal = 0
    cur: dict[str, list] = {"pos": [], "id": [], "prompt": [], "ordinal": []}
    for b in _prompt_batches(path):
        for pos, pid, prompt, err in zip(b["pos"], b["id"], b["prompt"], b["error"]):
            if err or int(pos) in scan.skip:
                continue
            chunk = ordinal // shard_size
            if chunk not in done:
                for k, v in (("pos", int(pos)), ("id", str(pid)), ("prompt", str(prompt)), ("ordinal", ordinal)):
                    cur[k].append(v)
            ordinal += 1
            if ordinal % shard_size == 0:
                if cur["id"]:
                    yield chunk, cur
                cur = {k: [] for k in cur}
    if cur["id"]:
        yield (ordinal - 1) // shard_size, cur


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="img", file=sys.stderr, desc="generate", dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _say(msg: str) -> None:
    print(f"[ldmflow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _check_settings(bundle: ModelBundle, s: SamplerSettings) -> None:
    """Sampler-objective and step-count mismatches, before any prompt is read."""
    from models.denoiser import ObjectiveConfig
    from models.samplers import SAMPLER_OBJECTIVES, sampler_timesteps
    from models.schedules import ScheduleConfig
    if not hasattr(bundle, "diffusion_dir"):
        return   # a baseline family samples its own way
    d = Path(bundle.diffusion_dir)
    schedule = ScheduleConfig.from_dict(json.loads((d / "schedule.json").read_text()))
    obj = d / "objective.json"
    kind = (ObjectiveConfig.from_dict(json.loads(obj.read_text())) if obj.is_file() else ObjectiveConfig()).kind
    if SAMPLER_OBJECTIVES[s.sampler] != kind:
        raise GenerateError(f"sampler: {s.sampler!r} samples a {SAMPLER_OBJECTIVES[s.sampler]!r} objective, "
                            f"the model is {kind!r}")
    try:
        sampler_timesteps(s.sampler, schedule.num_timesteps, s.steps, s.spacing)
    except ValueError as e:
        raise GenerateError(f"steps: {e}") from None


def generate(cfg: GenerateConfig, model: ResolvedModel | None = None) -> GenerateResult:
    """Run (or resume) a generation job; Ray must be initialised. See the module docstring.
    `model`: cfg.model already resolved (the CLI resolves it before starting Ray)."""
    from pipelines.lineage import code_version
    t_start = time.time()
    model = model or resolve_model(cfg.model, cfg.tracking_uri)
    try:
        settings = model.bundle.settings.replace(**cfg.overrides())
    except ValueError as e:
        raise GenerateError(str(e)) from None
    _check_settings(model.bundle, settings)
    _say(f"model {model.describe()}; scanning prompts {cfg.prompts}")
    scan = _scan(cfg.prompts)
    if scan.num_bad:
        shown = "; ".join(f"line {b['line']}: {b['error']}" for b in scan.bad[:10])
        more = f" (and {scan.num_bad - 10} more)" if scan.num_bad > 10 else ""
        if cfg.on_bad_line == "stop":
            raise GenerateError(f"prompts: {cfg.prompts}: {scan.num_bad} bad line(s), nothing generated "
                                f"(--on-bad-line stop): {shown}{more}")
        _say(f"skipping {scan.num_bad} bad line(s) in {cfg.prompts}: {shown}{more}")
    if scan.num_valid == 0:
        raise GenerateError(f"prompts: {cfg.prompts} holds no usable prompts")
    version = code_version()
    parts = {"model": model.bundle.content_hash(), "prompts": scan.sha,
             "settings": {**settings.to_dict(), "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
                          "on_bad_line": cfg.on_bad_line}}
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    num_chunks = -(-scan.num_valid // cfg.shard_size)
    job = {"fingerprint": fingerprint, "parts": parts, "model_ref": cfg.model, "model_source": model.source,
           "tracking_uri": model.tracking_uri, "prompts": cfg.prompts, "num_prompts": scan.num_valid,
           "num_chunks": num_chunks, "num_bad_lines": scan.num_bad, "code_version": version,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = _Out(cfg.out)
    resumed = _claim(out, job)
    _clean_tmp(out)
    done = _done_chunks(out)
    todo = scan.num_valid - sum(min(cfg.shard_size, scan.num_valid - k * cfg.shard_size) for k in done)
    _say(f"{scan.num_valid} prompts in {num_chunks} chunks; {len(done)} committed before"
         + (" (resuming)" if resumed else "") + f", {todo} images to make -> {cfg.out}")
    meta = {"sampler": settings.sampler, "spacing": settings.spacing, "steps": settings.steps,
            "guidance_scale": settings.guidance_scale, "eta": settings.eta, "use_ema": settings.use_ema,
            "resolution": settings.resolution, "global_seed": settings.seed, "precision": settings.precision,
            "compile": settings.compile, "model": cfg.model,
            "model_source": model.source, "model_hash": parts["model"], "job": fingerprint,
            "code_version": version, **{f"lineage.{k}": v for k, v in model.bundle.lineage.items()}}
    previews: list[tuple[bytes, str]] = []
    generated, gen_s, num_actors = 0, 0.0, 0
    if todo:
        generated, gen_s, previews, num_actors = _run_chunks(cfg, model, settings, scan, done, meta, todo)
    table = _finish(out, scan, num_chunks)
    if not previews:
        previews = _previews_from(out, table)
    ips = generated / gen_s if generated and gen_s > 0 else 0.0
    result = GenerateResult(out=cfg.out, num_images=table.num_rows, num_generated=generated,
                            seconds=time.time() - t_start, images_per_s=ips, num_bad_lines=scan.num_bad,
                            manifest=out.path(MANIFEST_FILE), bad_lines=scan.bad, num_actors=num_actors)
    out.write_atomic(BAD_LINES_FILE, json.dumps({"count": scan.num_bad, "lines": scan.bad}, indent=2).encode())
    result.run_id = _log_run(cfg, model, settings, result, job, previews)
    out.write_atomic(SUMMARY_FILE, json.dumps({k: v for k, v in asdict(result).items() if k != "bad_lines"},
                                              indent=2).encode())
    return result


def _run_chunks(cfg, model: ResolvedModel, settings, scan: _Scan, done: set[int], meta: dict, todo: int):
    import ray
    num_gpus = 1 if cfg.use_gpu else 0
    n = cfg.concurrency
    if not cfg.use_gpu:
        # Actors hold a CPU each for the whole job (the prompt read takes none, see READ_TASK_ARGS);
        # more actors than free CPUs would wait forever for theirs.
        free = int(ray.available_resources().get("CPU", 0))
        if n > free:
            _say(f"concurrency {n}: only {free} CPU(s) free in the Ray cluster; running {max(1, free)} actor(s)")
            n = max(1, free)
    Actor = ray.remote(num_cpus=0 if num_gpus else 1, num_gpus=num_gpus, max_restarts=0)(ChunkWriter)
    actors = [Actor.remote(model.source, model.tracking_uri, settings.to_dict(), cfg.out, meta,
                           cfg.batch_size, cfg.fault) for _ in range(n)]
    pending: dict[Any, Any] = {}
    previews: list[tuple[bytes, str]] = []
    generated = 0
    bar = None

    def collect(block: bool) -> None:
        nonlocal generated
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            idle.append(pending.pop(ref))
            res = ray.get(ref)   # an actor that died raises here: the job stops, committed chunks stay
            generated += res["count"]
            previews.extend(res["previews"])
            bar.update(res["count"])

    try:
        # Start the prompt read while the actors load their models: its Ray Data task needs a worker
        # process, and once the actors hold every CPU's prestarted worker a fresh one takes seconds
        # to start (measured: the first chunk went out 2.4 s after 2 actors on 2 cores were ready).
        chunks = _chunks(cfg.prompts, scan, cfg.shard_size, done)
        first = next(chunks, None)
        ray.get([a.ready.remote() for a in actors])   # model load errors surface here, once
        t0 = time.time()   # throughput counts sampling and commits, not actor start-up
        idle = list(actors)
        bar = _Progress(todo, cfg.progress)
        for chunk, rows in itertools.chain([first] if first is not None else [], chunks):
            while not idle:
                collect(block=True)
            actor = idle.pop()
            want = max(0, GRID_IMAGES - len(previews) - GRID_IMAGES * len(pending))
            pending[actor.run.remote(chunk, rows, want)] = actor
            collect(block=False)
        while pending:
            collect(block=True)
    finally:
        if bar is not None:
            bar.close()
        for a in actors:
            ray.kill(a)
    return generated, time.time() - t0, previews[:GRID_IMAGES], n


def _finish(out: _Out, scan: _Scan, num_chunks: int):
    """Rebuild manifest.parquet from the parts and check exactly-once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    missing = sorted(set(range(num_chunks)) - _done_chunks(out))
    if missing:
        raise RuntimeError(f"generate: chunks {missing[:10]} are not committed; run the job again to finish")
    tables = [pq.read_table(io.BytesIO(out.read(f"{PARTS_DIR}/{k:06d}.parquet"))) for k in range(num_chunks)]
    table = pa.concat_tables(tables).sort_by("ordinal")
    ids = table.column("id")
    if table.num_rows != scan.num_valid or len(pa.compute.unique(ids)) != table.num_rows:
        raise RuntimeError(f"generate: manifest has {table.num_rows} rows, {len(pa.compute.unique(ids))} ids; "
                           f"expected {scan.num_valid} once each")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_atomic(MANIFEST_FILE, buf.getvalue())
    return table


def read_manifest(out: str):
    """The job's manifest (pyarrow Table: id, prompt, seed, line, ordinal, key, shard, chunk, batch,
    png_sha256)."""
    import pyarrow.parquet as pq
    return pq.read_table(io.BytesIO(_Out(out).read(MANIFEST_FILE)))


def _shard_samples(out: _Out, shard: str) -> dict[str, dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander
    stream = io.BytesIO(out.read(shard))
    return {s["__key__"]: s for s in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}]))}


def _previews_from(out: _Out, table) -> list[tuple[bytes, str]]:
    first = table.slice(0, GRID_IMAGES).to_pylist()
    samples: dict[str, dict] = {}
    for shard in sorted({r["shard"] for r in first}):
        samples.update(_shard_samples(out, shard))
    return [(samples[r["key"]]["png"], r["prompt"]) for r in first]


def regenerate(out: str, prompt_id: str, tracking_uri: str | None = None) -> bytes:
    """Remake one committed image, bit for bit: its whole sub-batch is sampled again (the same
    prompts and seeds, read from its shard) with the job's model and settings, on one CPU thread
    like the actors. Returns the PNG bytes."""
    from pipelines.pyfunc import make_sampler, png_bytes, torch_threads
    o = _Out(out)
    job = json.loads(o.read(JOB_FILE))
    table = read_manifest(out)
    rows = [r for r in table.filter(np.array([i == prompt_id for i in table.column("id").to_pylist()]))
            .to_pylist()]
    if not rows:
        raise GenerateError(f"id: {prompt_id!r} is not in {out}/{MANIFEST_FILE}")
    row = rows[0]
    batch = [json.loads(s["json"]) for s in _shard_samples(o, row["shard"]).values()]
    batch = sorted((m for m in batch if m["batch"] == row["batch"]), key=lambda m: m["line"])
    keys = set(SamplerSettings().to_dict())
    settings = SamplerSettings.from_dict({k: v for k, v in job["parts"]["settings"].items() if k in keys})
    bundle = _materialize(job["model_source"], tracking_uri or job.get("tracking_uri"))
    with torch_threads(1):
        images = make_sampler(bundle, settings, device="cpu").sample([m["prompt"] for m in batch],
                                                                     [m["seed"] for m in batch])
    j = [m["id"] for m in batch].index(prompt_id)
    return png_bytes(images[j])


# ----------------------------------------------------------------------------------------------
# results in MLflow


def _log_run(cfg: GenerateConfig, model: ResolvedModel, settings: SamplerSettings, result: GenerateResult,
             job: dict, previews: list[tuple[bytes, str]]) -> str | None:
    import tempfile
    from PIL import Image
    from pipelines.images import caption_sheet
    from pipelines.tracking import TAG, Tracker
    uri = model.tracking_uri
    if not uri:
        _say("no tracking URI (--tracking-uri / MLFLOW_TRACKING_URI): the generation run is not logged")
        return None
    artifacts = ""
    if uri.startswith("sqlite:///"):   # embedded MLflow: artifacts beside its database, as Tracker.embedded
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    tracker = Tracker(uri=uri, artifact_location=artifacts, experiment=cfg.experiment)
    lin = model.bundle.lineage
    tags = {TAG["stage"]: "generate", TAG["code_version"]: job["code_version"], "ldmflow.generate.job": job["fingerprint"],
            "ldmflow.model_ref": cfg.model, "ldmflow.model_source": model.source,
            TAG["diffusion_version"]: lin.get("diffusion_model_version", ""),
            TAG["diffusion_hash"]: lin.get("diffusion_hash", ""),
            TAG["autoencoder_version"]: lin.get("autoencoder_model_version", ""),
            TAG["latent_cache_key"]: lin.get("latent_cache_key", ""),
            "ldmflow.output": cfg.out}
    if model.name:
        tags.update({"ldmflow.model_name": model.name, "ldmflow.model_version": model.version})
    if model.run_id:
        tags[TAG["upstream_runs"]] = model.run_id
    run_id = tracker.start_run("generate", tags=tags)
    ok = False
    try:
        tracker.log_params(run_id, {**settings.to_dict(), "model": cfg.model, "prompts": cfg.prompts, "out": cfg.out,
                                    "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
                                    "concurrency": cfg.concurrency, "on_bad_line": cfg.on_bad_line})
        tracker.log_metrics(run_id, {"num_images": result.num_images, "num_generated": result.num_generated,
                                     "images_per_s": result.images_per_s, "seconds": result.seconds,
                                     "num_bad_lines": result.num_bad_lines})
        with tempfile.TemporaryDirectory() as tmp:
            if previews:
                items = [(Image.open(io.BytesIO(p)).convert("RGB"), text) for p, text in previews]
                caption_sheet(items, cols=min(8, len(items)), size=96).save(Path(tmp) / "grid.png")
                tracker.log_artifact(run_id, Path(tmp) / "grid.png", "images")
            (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(
                {**{k: v for k, v in asdict(result).items() if k != "bad_lines"}, "job": job}, indent=2))
            tracker.log_artifact(run_id, Path(tmp) / SUMMARY_FILE)
        ok = True
    finally:
        tracker.end_run(run_id, ok=ok)
    return run_id
