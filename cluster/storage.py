"""Storage at a local path or a URL (s3://bucket/prefix, gs://, ...): one set of small helpers so
stages, Ray Train and the readers treat both alike.

fsspec does the listing, reading and copying (s3fs for s3://); Ray Train and Ray Data take a pyarrow
filesystem. Both find an S3-compatible endpoint (MinIO, moto, Ceph) in `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, and credentials in the usual AWS chain (env, profile, instance role).

A directory at a URL is "complete" only when its marker file is there: `upload_dir` writes the
files named `last` after everything else, so a reader that finds the marker finds the rest, and an
interrupted upload (no marker) is never taken for a finished one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

__all__ = ["StorageError", "is_url", "join", "filesystem", "pyarrow_filesystem", "s3_endpoint",
           "endpoint_env", "check_location", "exists", "isfile", "read_text", "write_text", "listdir",
           "upload_dir", "download_dir"]

# Endpoint settings a worker on another node needs to reach the same object store. Credentials are
# deliberately not forwarded (runtime envs are visible in the Ray dashboard): workers get theirs from
# their own environment or instance role.
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                     "MLFLOW_S3_ENDPOINT_URL")


class StorageError(FileNotFoundError):
    """A storage location is unusable (missing bucket, no access); the message names it and the
    config field it came from. A FileNotFoundError, so command lines report it as bad input."""


def is_url(path: str | os.PathLike) -> bool:
    """True for remote URLs (s3://, gs://, memory://, ...); plain paths and file:// are local."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a URL (always '/') or a local path."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(str(base).removeprefix("file://"), *parts)


def filesystem(path: str | os.PathLike):
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    import fsspec
    return fsspec.core.url_to_fs(str(path))


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (the AWS SDKs' variables), None = AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def endpoint_env() -> dict[str, str]:
    """The endpoint/region variables set here, for workers' runtime env (see ENDPOINT_ENV_VARS)."""
    return {k: os.environ[k] for k in ENDPOINT_ENV_VARS if os.environ.get(k)}


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path inside it) for Ray Train's storage and Ray Data's readers.

    For s3:// the endpoint is set explicitly (endpoint_override) rather than left to the
    environment: the filesystem object is pickled to Ray workers, which may run where the variable
    is not set."""
    import pyarrow.fs as pafs
    if not is_url(url):
        return pafs.LocalFileSystem(), os.path.abspath(str(url).removeprefix("file://"))
    scheme, rest = url.split("://", 1)
    if scheme in ("s3", "s3a"):
        kwargs = {}
        endpoint = s3_endpoint()
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = endpoint.split("://", 1)[0] if "://" in endpoint else "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
    return pafs.FileSystem.from_uri(url)


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def check_location(url: str | None, field: str) -> None:
    """Fail early, naming `field`, when URL `url`'s bucket does not exist or cannot be reached.
    Local paths and None pass (they are created on use)."""
    if not url or not is_url(url):
        return
    bucket = _bucket(url)
    if not bucket:
        raise StorageError(f"{field}: {url!r} names no bucket")
    fs, _ = filesystem(url)
    try:
        fs.invalidate_cache(bucket)
        found = fs.exists(bucket)
    except PermissionError as e:
        raise StorageError(f"{field}: no access to bucket {bucket!r} ({url}): {e}") from None
    except OSError as e:
        raise StorageError(f"{field}: cannot reach bucket {bucket!r} ({url}): {e}") from None
    if not found:
        raise StorageError(f"{field}: bucket {bucket!r} does not exist ({url})")


def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.exists(str(path).removeprefix("file://"))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)   # another process (a Ray worker) may have written it since the last listing
    return fs.exists(p)


def isfile(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(str(path).removeprefix("file://"))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    return fs.isfile(p)


def read_text(path: str | os.PathLike) -> str:
    if not is_url(path):
        return Path(str(path).removeprefix("file://")).read_text()
    fs, p = filesystem(path)
    return fs.cat_file(p).decode()


def write_text(path: str | os.PathLike, text: str) -> None:
    if not is_url(path):
        Path(str(path).removeprefix("file://")).write_text(text)
        return
    fs, p = filesystem(path)
    fs.pipe_file(p, text.encode())


def listdir(path: str | os.PathLike, dirs_only: bool = False) -> list[str]:
    """Names (not paths) of the entries directly under `path`, sorted; [] when it does not exist."""
    if not is_url(path):
        p = str(path).removeprefix("file://")
        if not os.path.isdir(p):
            return []
        return sorted(d for d in os.listdir(p) if not dirs_only or os.path.isdir(os.path.join(p, d)))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    try:
        entries = fs.ls(p, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                  if e["name"].rstrip("/") != p.rstrip("/") and (not dirs_only or e["type"] == "directory"))


def _files(local_dir: Path) -> list[str]:
    return sorted(str(f.relative_to(local_dir)) for f in local_dir.rglob("*") if f.is_file())


def upload_dir(local_dir: str | os.PathLike, url: str, last: Iterable[str] = ()) -> list[str]:
    """Copy every file under `local_dir` to `url` (same relative paths); the files named in `last`
    (relative paths) go after all the others, one by one: their presence marks a complete copy.
    Returns the relative paths copied."""
    local_dir = Path(local_dir)
    files = _files(local_dir)
    last = [f for f in last if f in files]
    rest = [f for f in files if f not in last]
    fs, root = filesystem(url)
    if rest:
        # One call with lists: s3fs uploads them concurrently.
        fs.put([str(local_dir / f) for f in rest], [f"{root}/{f}" for f in rest])
    for f in last:
        fs.put_file(str(local_dir / f), f"{root}/{f}")
    return rest + last


def download_dir(url: str, local_dir: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Copy every object under `url` into `local_dir` (same relative paths), skipping relative paths
    that start with one of `exclude` (e.g. "shards/"). Returns the relative paths copied."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    exclude = tuple(exclude)
    rel = sorted(p[len(root) + 1:] for p in fs.find(root))
    rel = [r for r in rel if r and not r.startswith(exclude)]
    local_dir = Path(local_dir)
    for r in rel:
        (local_dir / r).parent.mkdir(parents=True, exist_ok=True)
    if rel:
        fs.get([f"{root}/{r}" for r in rel], [str(local_dir / r) for r in rel])
    return rel
