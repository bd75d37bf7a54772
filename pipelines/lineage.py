"""Content hashes and code versions: the identities that lineage tags and cache keys are made of."""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["file_sha256", "files_hash", "dir_hash", "code_version", "write_artifact_json",
           "read_artifact_json"]


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
