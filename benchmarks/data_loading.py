"""Training-input throughput: latent / image batches decoded once into memory vs streamed from
the tar shards, side by side in one process on the same shards.

    python benchmarks/data_loading.py runs/quickstart     # a finished run's data and latent cache

Prints one Markdown table row per loader; BENCHMARKS.md keeps the table and this command.
"""
from __future__ import annotations

import glob
import sys
import time
from pathlib import Path

from pipelines.train_autoencoder import image_batches
from pipelines.train_diffusion import latent_batches


def rate(make, batches: int, batch_size: int) -> float:
    it = make()
    next(it)                       # the first batch pays for the preload / buffer fill
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t)


def main(run: str, batches: int = 300, batch_size: int = 32) -> None:
    latents = sorted(glob.glob(f"{run}/latents/*/shards/*.tar"))
    images = sorted(glob.glob(f"{run}/data/train/*.tar"))
    if not latents or not images:
        sys.exit(f"{run}: no finished quickstart run (data/train and latents/*/shards)")
    rows = []
    for name, make in [
        ("latents, streamed", lambda: latent_batches(latents, 0, 2, batch_size, 0, preload_max_bytes=0)),
        ("latents, in memory", lambda: latent_batches(latents, 0, 2, batch_size, 0)),
        ("images, streamed", lambda: image_batches(images, 0, 2, batch_size, 32, 0, preload_max_bytes=0)),
        ("images, in memory", lambda: image_batches(images, 0, 2, batch_size, 32, 0)),
    ]:
        rows.append((name, rate(make, batches, batch_size)))
    print("| loader (rank 0 of 2, batch %d) | samples/s | vs streamed |" % batch_size)
    print("|---|---|---|")
    for i, (name, r) in enumerate(rows):
        base = rows[i - i % 2][1]
        print(f"| {name} | {r:,.0f} | {r / base:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
