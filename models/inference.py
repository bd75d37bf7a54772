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
batch-16 forward: two threads on the 16 run at ~75% of twice one thread's rate), while two
independent halves on one thread each run side by side at ~93%. Eager ops release the GIL while
they compute, so eager halves overlap: the guided DDIM-20 loop at batch 8 ran 1.07x (DDIM) and
1.08x (DPM-Solver++) faster in 2 streams than in one (BENCHMARKS.md; 1.16x in a separate run). Not for torch.compile'd models: inductor's
default Python wrapper holds the GIL between kernels (two threads gained 5%), and with its C++
wrapper (which overlaps: 3.70 s vs 4.11 s) dynamo's guard check, run by both threads at once,
failed once in ~100 calls in each of two runs ("runtime guards failed even though they passed")
and recompiled the whole U-Net, a 90-120 s stall; so the sampler runs compiled models in one stream.
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


def compile_frozen(module: nn.Module, dynamic: bool = False) -> nn.Module:
    """Compile `module` in place for inference, its weights frozen into the graph; returns it.

    The parameters stop requiring grad, and the first call (which compiles) captures their values:
    load weights and cast dtypes before it, and change nothing after it (a changed weight is not
    seen; compile a fresh copy instead). The state dict keys are unchanged (the wrapper replaces
    the instance's `forward`, the module tree stays as it was). `dynamic=False` specialises on the
    first input shapes; another shape compiles again. Calls must run without grad
    (torch.no_grad() or torch.inference_mode()): a call with grad enabled raises RuntimeError.
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
        with torch._inductor.config.patch(freezing=True):
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
    For eager models only (see the module docstring for why not torch.compile'd ones).
    The caller's grad, inference-mode and CPU-autocast state hold in the workers (they are
    thread-local in torch), and its intra-op thread count is restored when the call returns
    (torch's count is process-wide, which is also why calls from several threads take turns, each
    still split across the streams).
    """

    def __init__(self, model: Callable[..., torch.Tensor], streams: int):
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected an int >= 1, got {streams!r}")
        self.model = model
        self.streams = streams
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="ldmflow-stream") if streams > 1 else None
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

        with self._lock:   # calls from several threads (a threaded model server) take turns
            threads = torch.get_num_threads()   # read inside: another call's parts set it to 1
            try:
                outs = list(self._pool.map(part, range(n)))
            finally:
                torch.set_num_threads(threads)
        return torch.cat(outs)

    def close(self) -> None:
        """Stop the worker threads (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
