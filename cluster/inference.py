"""Ray Data batch inference: a model loaded once per actor, batches streamed through a pool."""
from __future__ import annotations

from typing import Any

__all__ = ["read_shards", "from_rows", "map_with_actors"]


def read_shards(urls: list[str]):
    """WebDataset shards as a Ray Dataset of raw members (bytes, undecoded: decoding happens in the
    actors, by extension and without pickle). Columns: __key__, __url__?, one per extension."""
    import ray.data
    # decoder=None: raw bytes. Ray's default decoder would unpickle .pyd/.pt members of untrusted
    # shards (and decoder=False still decodes images and text).
    return ray.data.read_webdataset(urls, decoder=None, include_paths=False)


def from_rows(rows: list[dict]):
    import ray.data
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))


def map_with_actors(ds, actor_cls, ctor_kwargs: dict[str, Any], *, batch_size: int,
                    concurrency: int, num_cpus: float = 1, num_gpus: float = 0,
                    reserve_cpus: float = 0):
    """`actor_cls(**ctor_kwargs)` once per actor, then `actor(batch) -> batch` over the dataset.

    `reserve_cpus`: CPUs the pool must leave free for the pipeline's read and write tasks. Actors
    hold their CPUs for the whole run: a pool that takes every CPU starves the reads feeding it and
    the dataset hangs (seen with 2 actors on a 2-CPU Ray)."""
    import ray
    from ray.data import ActorPoolStrategy
    if num_cpus and reserve_cpus:
        free = ray.cluster_resources().get("CPU", 0) - reserve_cpus
        concurrency = max(1, min(concurrency, int(free // num_cpus)))
    return ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size,
                          compute=ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                          num_gpus=num_gpus, batch_format="numpy")
