"""Content hashes and code versions: the identities that lineage tags and cache keys are made of.

Two notions of "code version" live here, for two jobs:
  * `code_version()`: package version + git commit (+ ".dirty"). Recorded on every MLflow run for
    lineage: it says which commit made a result.
  * `stage_code_hash(module)`: a hash of the source of the Python modules a stage actually runs
    (the stage module and, transitively, every project module it imports, found by reading the
    import statements). It is part of a stage's cache key, so a docs-only commit (or a change to
    another stage's code) does not recompute a stage, while a change to code it runs does.
    `pipelines.config` is the one boundary not followed: its effect on a stage is the resolved
    config section, which the key hashes already (otherwise every stage would import every model
    module through the config classes and any model edit would retrain the autoencoder).
    Not covered: third-party package versions (torch, ray, ...) and code loaded by name at run time.
"""
from __future__ import annotations

import ast
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

__all__ = ["file_sha256", "files_hash", "dir_hash", "code_version", "code_commit", "write_artifact_json",
           "read_artifact_json", "stage_code_hash", "module_closure", "stage_key"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("models", "cluster", "pipelines")
# Modules whose effect on a stage is already in its key by other means (see the module docstring).
CODE_HASH_BOUNDARY = frozenset({"pipelines.config"})
KEY_FORMAT = "ldmflow-stage-key-v1"   # bump when the key recipe changes: every stage becomes stale


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def url_sha256(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        import fsspec
        h = hashlib.sha256()
        with fsspec.open(url, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    return file_sha256(url.removeprefix("file://"))


def files_hash(urls: Iterable[str]) -> str:
    """Hash of an ordered set of files by content (names do not count: a copy hashes the same)."""
    h = hashlib.sha256()
    for url in urls:
        h.update(url_sha256(url).encode())
    return h.hexdigest()[:16]


def dir_hash(directory: str | Path) -> str:
    """Hash of a directory's files (relative names and contents)."""
    root = Path(directory)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def code_version() -> str:
    """The package version plus the git commit of the source tree, '+dirty' if it has edits."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("ldmflow")
    except PackageNotFoundError:
        v = "unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            v += f"+g{commit}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def code_commit() -> str | None:
    """The git commit of the source tree (12 hex digits), or None outside a git checkout."""
    v = code_version()
    if "+g" not in v:
        return None
    return v.split("+g", 1)[1].split(".", 1)[0]


@lru_cache(maxsize=None)
def _package_parent(package: str) -> Path:
    """The directory holding top-level `package` as Python would import it. Not one shared root:
    Ray Jobs' py_modules unpack models/, cluster/ and pipelines/ into separate directories."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return PROJECT_ROOT
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _module_file(name: str, root: Path | None) -> Path | None:
    if root is None:
        root = _package_parent(name.split(".")[0])
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Project modules `path` imports anywhere (top level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            # `from pkg import sub` may name a submodule
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PROJECT_PACKAGES}


def module_closure(module: str, root: str | Path | None = None,
                   boundary: frozenset[str] = CODE_HASH_BOUNDARY) -> dict[str, Path]:
    """{module name: source file} for `module` and every project module it imports, transitively
    (parent packages' __init__ included: importing a.b runs a/__init__.py). Files are looked up
    under `root`, or by default wherever each project package is imported from."""
    root = None if root is None else Path(root)
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name in boundary:
            continue
        path = _module_file(name, root)
        if path is None:       # a name imported from a module, not a module itself
            continue
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imports(path, name))
    return seen


@lru_cache(maxsize=None)
def _stage_code_hash(module: str, root: str | None) -> str:
    h = hashlib.sha256()
    for name, path in sorted(module_closure(module, root).items()):
        h.update(name.encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()[:16]


def stage_code_hash(module: str, root: str | Path | None = None) -> str:
    """Hash of the source a stage runs: `module` and its project imports (see module docstring).
    The hash covers module names and file contents, not paths, so a job whose packages were
    unpacked apart (Ray py_modules) gets the same key as a local run of the same source.
    Cached per process: the source does not change under a running pipeline."""
    return _stage_code_hash(module, None if root is None else str(Path(root).resolve()))


def stage_key(stage: str, config: dict, inputs: dict[str, str], code: str,
              external: dict | None = None) -> tuple[str, dict]:
    """(key, parts): a stage output's identity. `config` is the resolved config the stage reads,
    `inputs` the content identities of its upstream artifacts ({stage: hash}), `code` its
    stage_code_hash, `external` identities of files outside the pipeline it reads (prompts...)."""
    parts = {"format": KEY_FORMAT, "stage": stage, "config": config, "inputs": dict(sorted(inputs.items())),
             "code": code, "external": external or {}}
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16], parts


def write_artifact_json(directory: str | Path, artifact) -> Path:
    """A stage's output record, written last (atomically): its presence means the stage finished."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = asdict(artifact) if is_dataclass(artifact) else artifact
    path = directory / "artifact.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_artifact_json(directory: str | Path) -> dict | None:
    path = Path(directory) / "artifact.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())
