"""Inference speed-ups: torch.compile with inductor's weight freezing, and batch streams.

Freezing treats the module's parameters and buffers as constants of the compiled graph, so
inductor folds what depends only on them (weight casts, layouts) and, on the CPU, pre-packs
convolution and linear weights for oneDNN and fuses their bias and activation
(mkldnn._convolution_pointwise / _linear_pointwise) instead of re-laying them out on every call.
Measured on this project's 2-core EPYC (avx512_bf16), bf16, the benchmark U-Net's guided batch-16
forward: eager 124 ms, torch.compile 123 ms, compiled with freezing 98 ms
(benchmarks/unet_speed.py times the whole sampling loop).

Freezing is an inductor setting read while compiling; `torch.compile(..., options={"freezing":
True})` does not reach the pass that needs it (measured: the graph kept aten.mkldnn_convolution),
so the compiling call runs under `torch._inductor.config.patch(freezing=True)`. Freezing only
applies to graphs compiled without autograd, hence the no-grad check.

`BatchStreams` runs one model call as several smaller ones at once, each on its own Python thread
with one intra-op thread (OpenVINO's "throughput streams"): on a CPU the small GEMMs and convolutions
of a latent U-Net parallelise poorly inside one op (2-core EPYC, the benchmark U-Net's guided
batch-16 compiled forward: 1 thread per 8-image half 170 ms alone, 2 threads on all 16 230 ms), while
two independent halves on one thread each run side by side at 93% efficiency, 182 ms for the 16.
The halves only overlap where the GIL is released: inside each op (eager), or for a whole graph
with inductor's C++ wrapper (`compile_frozen(..., cpp_wrapper=True)`); with inductor's default
Python wrapper the two threads serialise on its per-kernel Python calls (268 ms vs 283 ms).
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

__all__ = ["compile_frozen", "BatchStreams"]


def compile_frozen(module: nn.Module, dynamic: bool = False, cpp_wrapper: bool = False) -> nn.Module:
    """Compile `module` in place for inference, its weights frozen into the graph; returns it.

    The parameters stop requiring grad, and the first call (which compiles) captures their values:
    load weights and cast dtypes before it, and change nothing after it (a changed weight is not
    seen; compile a fresh copy instead). The state dict keys are unchanged (the wrapper replaces
    the instance's `forward`, the module tree stays as it was). `dynamic=False` specialises on the
    first input shapes; another shape compiles again. Calls must run without grad
    (torch.no_grad() or torch.inference_mode()): a call with grad enabled raises RuntimeError.
    `cpp_wrapper=True` has inductor call the graph's kernels from generated C++ instead of Python,
    which releases the GIL for the whole graph: what lets `BatchStreams` run compiled calls side by
    side (one graph call costs the same either way; the C++ wrapper adds some compile time).
    Inductor bakes the calling thread's intra-op thread count into the kernels it generates, so the
    first call (the compile) must run with the thread count later calls use: BatchStreams does.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "_frozen_compiled", False):
        raise ValueError("module: already compiled with compile_frozen")
    module.requires_grad_(False)
    compiled = torch.compile(module.forward, dynamic=dynamic)

    @functools.wraps(module.forward)
    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(module).__name__} was compiled for inference (compile_frozen): "
                               "call it under torch.no_grad() or torch.inference_mode()")
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
            return compiled(*args, **kwargs)

    module.forward = forward
    module._frozen_compiled = True
    return module


class BatchStreams:
    """`model(x, t, **kwargs)`, the model-callable contract of models.samplers, with the batch split
    into `streams` parts that run at once on worker threads, each with one intra-op thread; the parts'
    outputs are concatenated back in order. See the module docstring for why and when it pays.

    Every tensor argument whose first dimension is x's batch is split with x (so wrap the network
    call, inside cfg_model, where x, t, context and mask all are batched); 0-d tensors, other
    tensors and non-tensors go whole to every part. Each output row depends only on its input rows
    for eval-mode networks without batch statistics (GroupNorm, LayerNorm: every U-Net here), so the
    result equals the unsplit call up to the rounding of smaller GEMMs. A batch smaller than
    `streams` uses one stream per row; `streams` 1, or tensors not on the CPU, call the model as is.
    The caller's grad, inference-mode and CPU-autocast state hold in the workers (they are
    thread-local in torch), and its intra-op thread count is restored when the call returns
    (torch's count is process-wide). The first call of each set of part shapes runs its parts one
    after another, so that a torch.compile'd model compiles once per shape, on a worker thread
    with the one intra-op thread its kernels will run with. Not re-entrant: one call at a time.
    """

    def __init__(self, model: Callable[..., torch.Tensor], streams: int):
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected an int >= 1, got {streams!r}")
        self.model = model
        self.streams = streams
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="ldmflow-stream") if streams > 1 else None
        self._warm: set[tuple] = set()
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        b = x.shape[0]
        n = min(self.streams, b)
        if n <= 1 or x.device.type != "cpu":
            return self.model(x, t, **kwargs)

        def split(v: Any) -> list[Any]:
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b:
                return list(torch.tensor_split(v, n))
            return [v] * n

        xs, ts = split(x), split(t)
        kw = {k: split(v) for k, v in kwargs.items()}
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled("cpu")
        autocast_dtype = torch.get_autocast_dtype("cpu")

        def part(i: int) -> torch.Tensor:
            torch.set_num_threads(1)
            mode = torch.inference_mode() if inference else torch.set_grad_enabled(grad)
            with mode, torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
                return self.model(xs[i], ts[i], **{k: v[i] for k, v in kw.items()})

        shapes = tuple(tuple(c.shape) for c in xs)
        threads = torch.get_num_threads()
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("BatchStreams: called again while a call is running (one call at a time)")
        try:
            if shapes in self._warm:
                outs = list(self._pool.map(part, range(n)))
            else:
                outs = [self._pool.submit(part, i).result() for i in range(n)]
                self._warm.add(shapes)
        finally:
            torch.set_num_threads(threads)
            self._lock.release()
        return torch.cat(outs)

    def close(self) -> None:
        """Stop the worker threads (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
