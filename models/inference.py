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
1.08x (DPM-Solver++) faster in 2 streams than in one (BENCHMARKS.md; 1.16x in a separate run).

Compiled models need `export_frozen` for streams, not `compile_frozen` (torch.compile):
- inductor's default Python wrapper holds the GIL between kernels (two threads gained 5%), so its
  C++ wrapper is needed for the parts to overlap;
- torch.compile evaluates TorchDynamo's guards on every call, and with two stream threads calling
  at once that check failed once in ~100 calls in each of two runs ("runtime guards failed even
  though they passed") and recompiled the whole U-Net, a 90-120 s stall.
`export_frozen` traces with torch.export and compiles the graph with inductor directly (C++ wrapper
on the CPU), so no guard runs per call; it keys its static graphs itself. What the compiled streams
gain depends on the machine's load (2-core EPYC with avx512_bf16, the benchmark U-Net's bf16 guided
batch-16 forward, interleaved): on a quiet machine nothing (one graph on 2 threads 99-106 ms, two
1-thread streams 100-105 ms: the frozen graph's kernels scale to 2 threads); while another process
took CPU time, 112 ms in two streams against 166 ms in one graph, whose OpenMP barriers wait for
a descheduled thread where independent streams do not (and the guided DDIM-20 loop of the full
benchmark run 1.14x). So the sampler streams compiled graphs too.
"""
from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

__all__ = ["compile_frozen", "export_frozen", "BatchStreams"]


def _claim(module: nn.Module) -> None:
    """The checks and the freezing compile_frozen and export_frozen share, before they wrap `forward`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "_frozen_compiled", False):
        raise ValueError("module: already compiled with compile_frozen or export_frozen")
    module.requires_grad_(False)


def _refuse_grad(module: nn.Module, how: str) -> None:
    # Freezing applies only to graphs compiled without autograd (and a frozen weight has no grad).
    if torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} was compiled for inference ({how}): "
                           "call it under torch.no_grad() or torch.inference_mode()")


def _install(module: nn.Module, forward: Callable[..., Any]) -> nn.Module:
    # On the instance: the module tree, and so the state dict keys, stay as they were.
    module.forward = forward
    module._frozen_compiled = True
    return module


def compile_frozen(module: nn.Module, dynamic: bool = False) -> nn.Module:
    """Compile `module` in place for inference, its weights frozen into the graph; returns it.

    The parameters stop requiring grad, and the first call (which compiles) captures their values:
    load weights and cast dtypes before it, and change nothing after it (a changed weight is not
    seen; compile a fresh copy instead). The state dict keys are unchanged (the wrapper replaces
    the instance's `forward`, the module tree stays as it was). `dynamic=False` specialises on the
    first input shapes; another shape compiles again. Calls must run without grad
    (torch.no_grad() or torch.inference_mode()): a call with grad enabled raises RuntimeError.
    """
    _claim(module)
    compiled = torch.compile(module.forward, dynamic=dynamic)

    @functools.wraps(module.forward)
    def forward(*args, **kwargs):
        _refuse_grad(module, "compile_frozen")
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return _install(module, forward)


class _Call(nn.Module):
    """`forward(*tensors)` = the wrapped module's original forward with `template`'s non-tensor
    arguments (None, numbers) put back in place: what export traces, so the graph takes only
    tensors (the module's own `forward` attribute is the dispatcher by then)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any], template: tuple[Any, ...]):
        super().__init__()
        self.module = module   # registered: its parameters and buffers become the graph's constants
        self._forward = forward
        self._template = template

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        return self._forward(*(next(it) if isinstance(a, torch.Tensor) else a for a in self._template))


def _signature_key(value: Any) -> Any:
    # What a static graph is specialised on: shape, dtype, device and layout for a tensor, the value
    # for anything else export bakes in (None, numbers, strings).
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.stride())
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"export_frozen: arguments must be tensors or hashable constants, got "
                        f"{type(value).__name__}") from None
    return ("const", type(value).__name__, value)


def export_frozen(module: nn.Module) -> nn.Module:
    """Compile `module` in place for inference like `compile_frozen` (weights frozen, no grad, state
    dict keys unchanged), but through torch.export and inductor directly, with no TorchDynamo guard
    evaluated per call: safe to call from several threads at once, so `BatchStreams` can run its
    parts in compiled graphs.

    One static graph per call signature (every tensor argument's shape, dtype, device and strides,
    every other argument's value) and per intra-op thread count, compiled on the first call that
    has it: inductor writes the thread count into its CPU kernels, so a graph compiled on 2 threads
    would run 2 OpenMP threads inside each of two 1-thread streams. A call compiling a graph holds
    the others back (one graph is built once when both streams of a split batch ask for it). On the
    CPU inductor's C++ wrapper runs the graph: its Python wrapper takes the GIL between kernels,
    which serialises the streams. The module is traced in its current mode (call `.eval()` first)
    and with its current weights; each graph holds its own frozen (pre-packed) copy of them. Calls
    must run without grad, as for compile_frozen.
    """
    if isinstance(module, nn.Module) and module.training:
        raise ValueError(f"module: {type(module).__name__} is in training mode; call .eval() before export_frozen "
                         "(export bakes the mode into the graph)")
    original = getattr(module, "forward", None)
    if isinstance(module, nn.Module) and any(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(original).parameters.values()):
        raise TypeError(f"module: {type(module).__name__}.forward takes *args or **kwargs; export_frozen needs "
                        "fixed parameters (it keys its graphs on them)")
    _claim(module)
    signature = inspect.signature(original)
    graphs: dict[Any, Callable[..., Any]] = {}
    lock = threading.Lock()

    def build(args: tuple[Any, ...]) -> Callable[..., Any]:
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        device = tensors[0].device if tensors else torch.device("cpu")
        program = torch.export.export(_Call(module, original, args), tensors)
        options = {"freezing": True, "cpp_wrapper": device.type == "cpu"}
        graph = torch._inductor.compile(program.module(), list(tensors), options)
        graph(*tensors)   # the first call of an inductor graph finishes loading its kernels: do it here
        return graph

    @functools.wraps(original)
    def forward(*args, **kwargs):
        _refuse_grad(module, "export_frozen")
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flat = tuple(bound.arguments.values())
        key = (torch.get_num_threads(), tuple(_signature_key(a) for a in flat))
        graph = graphs.get(key)
        if graph is None:
            with lock:
                graph = graphs.get(key)
                if graph is None:
                    graph = graphs[key] = build(flat)
        return graph(*(a for a in flat if isinstance(a, torch.Tensor)))

    # For tests and introspection: {(threads, signature): graph}. On the function, not the module:
    # export snapshots a traced module's attributes and puts the copies back when it is done.
    forward.graphs = graphs
    return _install(module, forward)


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
    For eager models and `export_frozen` ones, not `compile_frozen` ones (see the module docstring).
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
