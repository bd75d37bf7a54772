"""`ldmflow generate` images/s with 1 and 2 Ray actors vs a plain loop over the same sampler.

    python benchmarks/generation_scaling.py [--quick] [--size medium] [--json PATH]

A random-weight model bundle (the layout of pipelines.pyfunc.write_bundle, like tests/gen_fixtures
`tiny_bundle`) of a chosen size; the default is one where sampling one image takes >= 0.2 s at one
thread, so the sampler - not Ray's per-chunk messages or the shard commits - is what is timed.
Three ways over the same prompts, batches and settings, interleaved per repetition:

  plain     one process, `make_sampler(bundle)` at 1 thread (the actors' setting), the same
            sub-batches, each image PNG-encoded as the actors do;
  1 actor   `pipelines.generate.generate(concurrency=1)` (what `ldmflow generate` runs) on a local
            Ray of our own, in this process (the CLI's own Ray would get os.cpu_count() CPUs);
  2 actors  the same with concurrency=2;
  2 plain   two plain processes at once, half the prompts each (no Ray): the scaling the machine
            itself allows two 1-thread samplers (shared L3, memory bandwidth, clocks), shown beside
            the 2-actor figure as its ceiling.

generate's own images/s is used (from actors ready to the last chunk committed: sampling, PNG
encoding, shard + manifest commits, Ray scheduling; not model loading). Reported:
  Ray overhead       = 1 - (1-actor rate / plain rate)        target <= 10%
  scaling efficiency = 2-actor rate / (2 x 1-actor rate)      target >= 90%
Ray gets num_cpus = 2, as the CLI's own Ray does on this 2-core machine: generate's prompt read
reserves no CPU, so 2 actors fit. On a machine with fewer than 2 free cores the 2-actor figure
measures the machine, not Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OVERHEAD_TARGET = 0.10      # 1 - (1-actor / plain), at most
EFFICIENCY_TARGET = 0.90    # 2-actor / (2 x 1-actor), at least


@dataclass(frozen=True)
class BundleSize:
    """A random bundle's architecture: what one sampled image costs."""
    resolution: int             # pixels; the autoencoder is f4, latents resolution / 4
    ae_ch: int                  # autoencoder base width (ch_mult (1, 2, 2))
    text_layers: int
    text_width: int             # = U-Net context_dim
    text_heads: int
    unet_channels: int
    unet_mult: tuple[int, ...]
    unet_attention: tuple[int, ...]
    unet_heads: int
    steps: int                  # DDIM steps (CFG: each is one U-Net call on a doubled batch)


# Flat registry: --size choices. "medium" is the default: at 1 thread an image takes >= 0.2 s
# (measured 2.96 s/image on the 2-core machine under a load average of 10; "quickstart" 0.51 s there,
# which a quiet machine brings under 0.2 s).
SIZES: dict[str, BundleSize] = {
    "tiny": BundleSize(16, 8, 1, 32, 2, 16, (1, 2), (1,), 2, 3),                  # tests' tiny_bundle
    "quickstart": BundleSize(32, 16, 4, 256, 4, 32, (1, 2), (1,), 4, 50),         # the quickstart's models
    "medium": BundleSize(64, 32, 4, 256, 4, 64, (1, 2, 2), (1, 2), 4, 50),
}
DEFAULT_SIZE = "medium"


def make_bundle(directory: Path, size: BundleSize, seed: int = 0) -> Path:
    """A complete random-weight bundle of `size` (tests/gen_fixtures.tiny_bundle, sized)."""
    import torch
    from models.autoencoder import AutoencoderConfig, AutoencoderKL, save_pretrained
    from models.checkpoint import save_module
    from models.denoiser import ObjectiveConfig
    from models.schedules import ScheduleConfig
    from models.text import TextEncoder, TextEncoderConfig, save_text_encoder
    from models.unet import UNet, UNetConfig
    from pipelines.pyfunc import ModelBundle, SamplerSettings, write_bundle
    src = directory / "parts"
    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(resolution=size.resolution, ch=size.ae_ch, ch_mult=(1, 2, 2),
                                         num_res_blocks=1, z_channels=4))
    save_pretrained(ae, src / "autoencoder", extra={"scale_factor": 0.5})
    text = TextEncoder(TextEncoderConfig(layers=size.text_layers, width=size.text_width, heads=size.text_heads,
                                         context_length=16), load_pretrained=False).eval()
    save_text_encoder(text, src / "text_encoder")
    with torch.no_grad():
        states, mask = text.encode([""])
    np.savez(src / "null_text.npz", states=states[0].float().numpy(), mask=mask[0].numpy())
    ucfg = UNetConfig(channels=size.unet_channels, channel_mult=size.unet_mult, num_res_blocks=1,
                      attention_levels=size.unet_attention, num_heads=size.unet_heads,
                      context_dim=size.text_width)
    unet = UNet(ucfg)
    with torch.no_grad():   # the output conv starts at zero; any weights cost the same, zeros look odd
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    save_module(unet, ucfg.to_dict(), src / "diffusion" / "unet")
    (src / "diffusion" / "schedule.json").write_text(json.dumps(ScheduleConfig().to_dict()))
    (src / "diffusion" / "objective.json").write_text(json.dumps(ObjectiveConfig().to_dict()))
    bundle = ModelBundle(diffusion_dir=str(src / "diffusion"), autoencoder_dir=str(src / "autoencoder"),
                         text_encoder_dir=str(src / "text_encoder"), null_text_file=str(src / "null_text.npz"),
                         scale_factor=0.5, settings=SamplerSettings(steps=size.steps, guidance_scale=3.0, seed=seed),
                         lineage={"diffusion_model_version": "benchmark", "latent_cache_key": "none"})
    return write_bundle(bundle, directory / "bundle")


PROMPT_WORDS = (["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "triangle", "star"])


def prompts(n: int) -> list[str]:
    colors, shapes = PROMPT_WORDS
    return [f"a {colors[i % len(colors)]} {shapes[(i // len(colors)) % len(shapes)]}" for i in range(n)]


def _plain_loop(sampler, texts: list[str], batch_size: int) -> None:
    """Sample and PNG-encode `texts` in generate's sub-batches (seeds from the ids = line numbers)."""
    from pipelines.pyfunc import derive_seed, png_bytes
    seeds = [derive_seed(str(i + 1), sampler.settings.seed) for i in range(len(texts))]
    for b in range(0, len(texts), batch_size):
        for img in sampler.sample(texts[b:b + batch_size], seeds[b:b + batch_size]):
            png_bytes(img)


def plain_rate(bundle_dir: Path, texts: list[str], batch_size: int) -> float:
    """Images/s of a single-process loop over the sampler at 1 thread, batches as generate's."""
    from pipelines.pyfunc import ModelBundle, make_sampler, torch_threads
    with torch_threads(1):
        sampler = make_sampler(ModelBundle.from_dir(bundle_dir))
        t = time.perf_counter()
        _plain_loop(sampler, texts, batch_size)
        return len(texts) / (time.perf_counter() - t)


def _plain_process(bundle_dir: str, texts: list[str], batch_size: int, barrier, results) -> None:
    """One of plain_parallel_rate's processes: load and warm up, wait for the others, then time
    the loop alone (as plain_rate does)."""
    from pipelines.pyfunc import ModelBundle, make_sampler, torch_threads
    with torch_threads(1):
        sampler = make_sampler(ModelBundle.from_dir(Path(bundle_dir)))
        _plain_loop(sampler, texts[:batch_size], batch_size)   # first-call costs, not timed
        barrier.wait()
        t0 = time.time()   # wall clock: comparable across the processes
        _plain_loop(sampler, texts, batch_size)
        results.put((t0, time.time(), len(texts)))


def plain_parallel_rate(bundle_dir: Path, texts: list[str], batch_size: int, procs: int = 2) -> float:
    """Images/s of `procs` plain processes (1 thread each) sampling their share of the prompts at
    the same time, no Ray: what this machine gives two independent samplers (shared caches, memory
    bandwidth, clocks), the ceiling for the 2-actor figure."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    share = len(texts) // procs
    workers = [ctx.Process(target=_plain_process, args=(str(bundle_dir), texts[i * share:(i + 1) * share],
                                                         batch_size, barrier, results)) for i in range(procs)]
    for w in workers:
        w.start()
    got = [results.get(timeout=3600) for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a plain sampling process exited with {w.exitcode}")
    return sum(n for _, _, n in got) / (max(e for _, e, _ in got) - min(s for s, _, _ in got))


def generate_rate(bundle_dir: Path, prompts_file: Path, out: Path, concurrency: int, batch_size: int,
                  shard_size: int) -> float:
    from pipelines.generate import GenerateConfig, generate
    res = generate(GenerateConfig(model=str(bundle_dir), prompts=str(prompts_file), out=str(out),
                                  batch_size=batch_size, concurrency=concurrency, shard_size=shard_size,
                                  progress=False))
    if res.num_generated != res.num_images:
        raise RuntimeError(f"generate made {res.num_generated} of {res.num_images} images (a resumed out dir?)")
    if res.num_actors != concurrency:   # the figure would time fewer actors than it names
        raise RuntimeError(f"generate ran {res.num_actors} actor(s), asked for {concurrency}")
    return res.images_per_s


def run(quick: bool = False, size: str | None = None, num_prompts: int | None = None,
        batch_size: int | None = None, reps: int | None = None) -> dict:
    import ray
    from cluster.runtime import worker_env
    size = size or ("tiny" if quick else DEFAULT_SIZE)
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    n = num_prompts or (8 if quick else 32)
    bs = batch_size or (2 if quick else 8)
    reps = reps or (1 if quick else 3)
    shard = 2 * bs   # 2 sub-batches per chunk; n / shard chunks for the actors to share
    if n % shard:
        raise ValueError(f"num_prompts: expected a multiple of 2 x batch_size ({shard}), got {n}")
    os.environ.pop("MLFLOW_TRACKING_URI", None)   # no generation run logged: not part of the figure
    rates: dict[str, list[float]] = {"plain": [], "2 plain processes": [], "1 actor": [], "2 actors": []}
    with tempfile.TemporaryDirectory(prefix="ldmflow-bench-gen-") as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp, SIZES[size])
        texts = prompts(n)
        pfile = tmp / "prompts.txt"
        pfile.write_text("\n".join(texts) + "\n")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()}, logging_level="WARNING")
        try:
            plain_rate(bundle, texts[:bs], bs)   # warm-up: first-call costs of the plain process
            for r in range(reps):                # interleaved: machine load hits all three alike
                rates["plain"].append(plain_rate(bundle, texts, bs))
                rates["2 plain processes"].append(plain_parallel_rate(bundle, texts, bs, 2))
                for k, name in ((1, "1 actor"), (2, "2 actors")):
                    rates[name].append(generate_rate(bundle, pfile, tmp / f"out-{r}-{k}", k, bs, shard))
        finally:
            ray.shutdown()
    plain, plain2, one, two = (statistics.median(rates[k]) for k in ("plain", "2 plain processes", "1 actor",
                                                                      "2 actors"))
    overhead, efficiency = 1 - one / plain, two / (2 * one)
    machine = plain2 / (2 * plain)   # the same scaling without Ray: what the machine allows
    s = SIZES[size]
    setup = (f"bundle '{size}' (random weights): {s.resolution}px, U-Net {s.unet_channels} x{list(s.unet_mult)}, "
             f"text {s.text_layers}x{s.text_width}, DDIM {s.steps} steps + CFG; {n} prompts, batch {bs}, "
             f"{n // shard} chunks of {shard}; 1 thread per worker; {reps} interleaved repetition(s), median; "
             f"plain: {1 / plain:.2f} s/image")
    return {
        "benchmark": "generation_scaling",
        "title": "Batch generation: Ray actors vs a plain loop",
        "command": "python benchmarks/generation_scaling.py" + (" --quick" if quick else f" --size {size}"),
        "setup": setup,
        "table": {"columns": ["way", "images/s", "vs plain"],
                  "rows": [[k, f"{v:.2f}", f"{v / plain:.2f}x"] for k, v in
                           (("plain loop (1 process, 1 thread)", plain),
                            ("2 plain loops at once (2 processes, 1 thread each, no Ray)", plain2),
                            ("ldmflow generate, 1 actor", one),
                            ("ldmflow generate, 2 actors", two))]},
        "note": (f"Where the scaling goes: two plain processes with no Ray reach {machine:.0%} of twice one "
                 f"process's rate (two samplers sharing this machine's caches, memory bandwidth and clocks), "
                 f"and generate's 2 actors reach {efficiency:.0%} of twice one actor's: "
                 + (f"the machine accounts for all of the loss." if efficiency >= machine else
                    f"of the {1 - efficiency:.0%} lost, {1 - machine:.0%} is the machine's and "
                    f"{machine - efficiency:.0%} Ray's (its processes, the driver's reads and commits, on the "
                    f"same 2 cores).")),
        "figures": [
            {"name": "Ray overhead, 1 - (1 actor / plain)", "value": overhead * 100, "unit": "%",
             "baseline": "plain loop", "op": "<=", "target": OVERHEAD_TARGET * 100},
            {"name": "scaling efficiency, 2 actors / (2 x 1 actor)", "value": efficiency * 100, "unit": "%",
             "baseline": "1 actor", "op": ">=", "target": EFFICIENCY_TARGET * 100},
            # Shown, not judged: the ceiling the machine puts on the figure above, without Ray.
            {"name": "machine's own scaling, 2 plain processes / (2 x plain)", "value": machine * 100, "unit": "%",
             "baseline": "plain loop", "op": ">=", "target": None},
        ],
        "raw": {"images_per_s": rates, "seconds_per_image_plain": 1 / plain},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: the tiny bundle, 8 prompts, one repetition")
    p.add_argument("--size", choices=sorted(SIZES), help=f"bundle size (default {DEFAULT_SIZE}; --quick: tiny)")
    p.add_argument("--prompts", type=int, help="number of prompts (a multiple of 2 x batch size)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--reps", type=int, help="interleaved repetitions")
    p.add_argument("--json", help="also write the result here (benchmarks/run_all.py reads it)")
    args = p.parse_args(argv)
    res = run(args.quick, args.size, args.prompts, args.batch_size, args.reps)
    cols = res["table"]["columns"]
    print(f"{res['setup']}\n\n| {' | '.join(cols)} |\n|{'---|' * len(cols)}")
    for r in res["table"]["rows"]:
        print(f"| {' | '.join(r)} |")
    print(res["note"])
    for f in res["figures"]:
        goal = "no target" if f["target"] is None else f"target {f['op']} {f['target']:g}{f['unit']}"
        print(f"{f['name']}: {f['value']:.1f}{f['unit']} ({goal})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
