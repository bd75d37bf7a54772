"""models.inference.compile_frozen, export_frozen and BatchStreams against the eager, unsplit calls they replace
(issue 8; the timing is in benchmarks/unet_speed.py, and pipelines' compiled and streamed sampler is
tested whole in tests/test_sampling_speed_paths.py)."""

import copy
import threading

import pytest
import torch
from torch import nn

from models.inference import BatchStreams, compile_frozen, export_frozen


def conv_net() -> nn.Module:
    # A conv + bias + SiLU and a linear: what freezing pre-packs and fuses on the CPU; small, so
    # compiling takes seconds.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5)).eval()


def test_frozen_compile_matches_eager_and_freezes_weights():
    eager = conv_net()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = eager(x)
    fast = compile_frozen(copy.deepcopy(eager))
    assert not any(p.requires_grad for p in fast.parameters())
    assert list(fast.state_dict()) == list(eager.state_dict())   # checkpoints load either way
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():
        # The freezing took effect: the convolutions run as oneDNN's pre-packed fused kernels, not
        # as the plain aten convolution eager (or compiling without freezing) calls.
        from torch.profiler import profile
        with torch.no_grad(), profile() as prof:
            fast(x)
        ops = {e.key for e in prof.key_averages()}
        assert any(op.startswith("mkldnn::_convolution_pointwise") for op in ops), sorted(ops)
        assert "aten::mkldnn_convolution" not in ops and "aten::convolution" not in ops


def test_frozen_compile_refuses_grad_and_a_second_compile():
    fast = compile_frozen(conv_net())
    with pytest.raises(RuntimeError, match="compiled for inference.*no_grad"):
        fast(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="^module: already compiled"):
        compile_frozen(fast)
    with pytest.raises(TypeError, match="^module: expected a torch.nn.Module"):
        compile_frozen(lambda x: x)


class MaskedNet(nn.Module):
    """conv_net's layers with the argument kinds a U-Net call has: a batched tensor, an optional
    per-row mask (None or a tensor: two graphs) and a number export bakes in."""

    def __init__(self):
        super().__init__()
        self.net = conv_net()

    def forward(self, x, scale: float = 1.0, mask=None):
        out = self.net(x) * scale   # (B, 5)
        return out if mask is None else out.masked_fill(~mask, 0.0)


def test_export_frozen_matches_eager_one_graph_per_signature_and_thread_count():
    eager = MaskedNet().eval()
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(4, 3, 6, 6, generator=g), torch.rand(4, 5, generator=g) > 0.3
    with torch.no_grad():
        refs = [eager(x), eager(x, 2.0, mask), eager(x[:2], 2.0, mask[:2])]
    fast = export_frozen(copy.deepcopy(eager))
    assert not any(p.requires_grad for p in fast.parameters())
    assert list(fast.state_dict()) == list(eager.state_dict())
    threads = torch.get_num_threads()
    with torch.no_grad():
        outs = [fast(x), fast(x, 2.0, mask), fast(x[:2], scale=2.0, mask=mask[:2]),
                fast(x, mask=mask, scale=2.0)]   # keywords bind to the same signature: no new graph
    for out, ref in zip(outs, refs + [refs[1]]):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    graphs = fast.forward.graphs
    assert len(graphs) == 3 and {k[0] for k in graphs} == {threads}
    torch.set_num_threads(threads + 1)   # inductor writes the count into its kernels: a new graph
    try:
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), refs[0], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert len(graphs) == 4
    # The weights are frozen into the graphs (constants inductor pre-packs, not inputs read per
    # call): a changed parameter is not seen. (The C++ wrapper's kernel calls do not show in
    # torch.profiler, so compile_frozen's profile check cannot be made here.)
    with torch.no_grad():
        fast.net[0].weight.add_(1.0)
        torch.testing.assert_close(fast(x), refs[0], rtol=1e-5, atol=1e-5)


def test_export_frozen_graphs_run_in_concurrent_batch_streams():
    """No guard is evaluated per call, so the streams call one graph at once (compile_frozen's
    dynamo guard check raced there: models/inference.py): many concurrent calls, all exact."""
    eager = MaskedNet().eval()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 3, 6, 6, generator=g) for _ in range(4)]
    mask = torch.rand(6, 5, generator=g) > 0.3
    with torch.no_grad():
        refs = [eager(x, 1.0, mask) for x in xs]
    fast = export_frozen(copy.deepcopy(eager))
    split = BatchStreams(fast, 2)
    threads = torch.get_num_threads()
    with torch.no_grad():
        for i in range(60):
            torch.testing.assert_close(split(xs[i % 4], 1.0, mask=mask), refs[i % 4], rtol=1e-5, atol=1e-5)
    assert list(fast.forward.graphs) and all(k[0] == 1 for k in fast.forward.graphs)   # built in the streams
    assert len(fast.forward.graphs) == 1 and torch.get_num_threads() == threads
    split.close()


def test_export_frozen_refuses_grad_training_mode_and_bad_arguments():
    fast = export_frozen(MaskedNet().eval())
    with pytest.raises(RuntimeError, match="compiled for inference \\(export_frozen\\).*no_grad"):
        fast(torch.randn(1, 3, 6, 6))
    with torch.no_grad(), pytest.raises(TypeError, match="^export_frozen: arguments must be tensors or hashable"):
        fast(torch.randn(1, 3, 6, 6), [1.0])
    assert not fast.forward.graphs   # nothing was compiled for the refused calls
    for compiled in (fast, compile_frozen(conv_net())):
        with pytest.raises(ValueError, match="^module: already compiled"):
            export_frozen(compiled)
    with pytest.raises(ValueError, match="^module: MaskedNet is in training mode"):
        export_frozen(MaskedNet().train())
    with pytest.raises(TypeError, match="^module: expected a torch.nn.Module"):
        export_frozen(lambda x: x)

    class VarArgs(nn.Module):
        def forward(self, *xs):
            return xs[0]
    with pytest.raises(TypeError, match="^module: VarArgs.forward takes \\*args or \\*\\*kwargs"):
        export_frozen(VarArgs().eval())   # refused before anything is frozen or wrapped


# ------------------------------------------------------------------ BatchStreams


def tiny_unet_inputs(b: int = 5):
    from models.unet import UNet, UNetConfig
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          num_heads=2, context_dim=8)).eval()
    for p in net.parameters():   # zero-initialised output convs would make every output 0
        nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 4, 8, 8, generator=g)
    ctx = torch.randn(b, 5, 8, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 3:] = False   # one padded caption, so a wrong split of the mask would show
    return net, x, ctx, mask


@pytest.mark.parametrize("streams", [2, 3, 8])
def test_batch_streams_equal_the_unsplit_call(streams):
    net, x, ctx, mask = tiny_unet_inputs(5)
    t = torch.tensor([3, 700, 20, 999, 500])
    split = BatchStreams(net, streams)
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref = net(x, t, context=ctx, context_mask=mask)
        out = split(x, t, context=ctx, context_mask=mask)
        again = split(x, t, context=ctx, context_mask=mask)
        one_t = split(x, torch.tensor(250), context=ctx, context_mask=None)   # 0-d t, no mask: whole
        ref_one_t = net(x, torch.tensor(250), context=ctx)
    assert ref.abs().max() > 0.02   # every weight reaches the output
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.testing.assert_close(one_t, ref_one_t, rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == threads        # the caller's thread count is back
    split.close()


def test_batch_streams_run_parts_on_worker_threads_with_one_thread_and_the_callers_modes():
    seen = []

    def model(x, t, context=None):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled(), x.shape[0], context.shape[0]))
        return x * 2 + context.sum()

    split = BatchStreams(model, 2)
    x, ctx = torch.randn(5, 3), torch.ones(5, 2)
    with torch.no_grad():
        split(x, torch.tensor(0), context=ctx)
    seen.clear()
    with torch.inference_mode():
        out = split(x, torch.tensor(0), context=ctx)
    main = threading.get_ident()
    assert sorted(s[4] for s in seen) == [2, 3] and sorted(s[5] for s in seen) == [2, 3]   # batched args split
    assert all(s[0] != main and s[1] == 1 and not s[2] and s[3] for s in seen), seen
    assert out.is_inference()
    # With grad on, the parts keep the autograd graph (a split of the batch is still differentiable).
    w = torch.ones(3, requires_grad=True)
    y = BatchStreams(lambda x, t: x * w, 2)(x, torch.tensor(0))
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0))
    assert split(x[:1], torch.tensor(0), context=ctx[:1]).shape == (1, 3)   # fewer rows than streams


def test_batch_streams_called_from_two_threads_take_turns():
    net, x, ctx, mask = tiny_unet_inputs(4)
    split = BatchStreams(net, 2)
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref = [net(x, torch.tensor(t), context=ctx, context_mask=mask) for t in (10, 900)]
    got = {}

    def caller(t):
        with torch.no_grad():
            for _ in range(3):
                got[t] = split(x, torch.tensor(t), context=ctx, context_mask=mask)

    callers = [threading.Thread(target=caller, args=(t,)) for t in (10, 900)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    torch.testing.assert_close(got[10], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[900], ref[1], rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == threads


def test_batch_streams_refuse_a_bad_count():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^streams: expected an int >= 1"):
            BatchStreams(lambda x, t: x, bad)
    same = torch.randn(3, 2)
    assert BatchStreams(lambda x, t: x, 1)(same, torch.tensor(0)) is same   # one stream: the model, as is
