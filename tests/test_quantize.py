import threading

import pytest
import torch
import torch.nn.functional as F

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.autoencoder import save_pretrained as save_kl
from models.autoencoder_vq import AutoencoderVQ, AutoencoderVQConfig, load_pretrained, save_pretrained
from models.autoencoders import AUTOENCODER_FAMILIES, build_autoencoder, load_autoencoder
from models.quantize import QuantizerConfig, VectorQuantizer


def brute_force_nearest(flat, codes):
    return (flat[:, None, :] - codes[None]).pow(2).sum(-1).argmin(1)  # (N, K, D) -> (N,)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(codebook_size=0), "codebook_size"),
        (dict(code_dim=True), "code_dim"),
        (dict(beta=-0.1), "beta"),
        (dict(ema=1), "ema"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_epsilon=0.0), "ema_epsilon"),
        (dict(l2_normalize="yes"), "l2_normalize"),
        (dict(dead_code_steps=-1), "dead_code_steps"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        QuantizerConfig(**overrides)


def test_config_round_trip():
    c = QuantizerConfig(codebook_size=7, code_dim=3, ema=True, dead_code_steps=5)
    assert QuantizerConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown keys"):
        QuantizerConfig.from_dict({"codebok_size": 3})


def test_lookup_loss_and_straight_through_gradients():
    torch.manual_seed(0)
    beta = 0.25
    q = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=3, beta=beta))
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    idx = brute_force_nearest(flat, q.codebook.detach())
    assert torch.equal(out.indices.flatten(), idx)
    e = q.codebook.detach()[idx]
    assert torch.allclose(out.z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), e)
    mse = (flat - e).pow(2).mean()
    assert torch.allclose(out.loss, (1 + beta) * mse)
    # Straight-through: d(sum z_q)/dz = 1 everywhere; the loss adds 2 beta (z - e) / numel.
    (out.z_q.sum() + out.loss).backward()
    n = flat.numel()
    expected_z = 1 + 2 * beta * (flat - e) / n
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 3), expected_z, atol=1e-6)
    # The codebook term pulls each used code towards its inputs: 2 (e - z) / numel, summed per code.
    expected_cb = torch.zeros(8, 3).index_add_(0, idx, 2 * (e - flat) / n)
    assert torch.allclose(q.codebook.grad, expected_cb, atol=1e-6)
    # Stats: perplexity in [1, K]; usage = used codes / K.
    assert 1.0 <= out.stats["perplexity"].item() <= 8.0
    assert out.stats["usage"].item() == pytest.approx(idx.unique().numel() / 8)


def test_l2_normalized_lookup_is_by_direction():
    q = VectorQuantizer(QuantizerConfig(codebook_size=2, code_dim=2, l2_normalize=True))
    with torch.no_grad():
        # A long code pointing away and a short one pointing the same way as the input: Euclidean
        # lookup would pick the long one (distance 3.0 vs 9.96), cosine picks the short one.
        q.codebook.copy_(torch.tensor([[10.0, 0.5], [0.0, 0.01]]))
    z = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    out = q(z)
    assert out.indices.item() == 1
    assert torch.allclose(out.z_q.flatten(), torch.tensor([0.0, 1.0]))  # unit-norm code


def test_ema_update_matches_formula_and_has_no_codebook_gradient():
    torch.manual_seed(0)
    c = QuantizerConfig(codebook_size=4, code_dim=2, beta=0.5, ema=True, ema_decay=0.9, ema_epsilon=1e-5)
    q = VectorQuantizer(c).train()
    assert not any(p is q.codebook for p in q.parameters())  # a buffer: the optimiser never sees it
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
        q.embed_sum.copy_(q.codebook)
    z = torch.tensor([[0.9, 0.1], [1.1, -0.1], [0.1, 0.8], [0.0, 0.0]]).T.reshape(1, 2, 2, 2)
    z.requires_grad_(True)
    cb0, es0, cs0 = q.codebook.clone(), q.embed_sum.clone(), q.cluster_size.clone()
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    idx = brute_force_nearest(flat, cb0)
    # Commitment only: beta * ||z - sg[e]||^2 (mean).
    assert torch.allclose(out.loss, 0.5 * (flat - cb0[idx]).pow(2).mean())
    counts = torch.bincount(idx, minlength=4).float()
    sums = torch.zeros(4, 2).index_add_(0, idx, flat)
    cs = 0.9 * cs0 + 0.1 * counts
    es = 0.9 * es0 + 0.1 * sums
    n = cs.sum()
    smoothed = (cs + 1e-5) / (n + 4 * 1e-5) * n
    assert torch.allclose(q.cluster_size, cs)
    assert torch.allclose(q.codebook, es / smoothed[:, None])
    # Eval mode, and update=False, leave the codebook alone.
    before = q.codebook.clone()
    q.eval()(z)
    q.train()(z, update=False)
    assert torch.equal(q.codebook, before)


def test_ema_codebook_moves_to_cluster_means():
    torch.manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    q = VectorQuantizer(QuantizerConfig(codebook_size=3, code_dim=2, ema=True, ema_decay=0.8)).train()
    with torch.no_grad():
        init = centres + 0.5 * torch.randn(3, 2)
        q.codebook.copy_(init)
        q.embed_sum.copy_(init)
    for _ in range(60):
        pts = centres[torch.randint(3, (64,))] + 0.05 * torch.randn(64, 2)
        q(pts.T.reshape(1, 2, 8, 8))
    assert torch.allclose(q.codebook, centres, atol=0.05)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_at_batch_vectors(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, code_dim=2, ema=ema, ema_decay=0.5, dead_code_steps=3)).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.0], [100.0, 100.0], [-100.0, 100.0]]))
        if ema:
            q.embed_sum.copy_(q.codebook)
    z = (0.1 * torch.randn(1, 2, 4, 4))
    restarted = []
    for step in range(3):
        out = q(z)
        restarted.append(out.stats["restarted"].item())
    # Codes 2 and 3 are never picked: after 3 steps they are restarted, on batch vectors.
    assert restarted == [0.0, 0.0, 2.0]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (2, 3):
        assert (q.codebook[k] - flat).abs().sum(1).min() < 1e-6
    assert q.steps_unused[2:].tolist() == [0, 0]
    assert out.stats["dead"].item() == 2.0


def _run_ranks(fn, world):
    """Run fn(rank, all_reduce) in `world` threads with a summing all_reduce built on a barrier."""
    barrier = threading.Barrier(world)
    slots = [None] * world
    results, errors = [None] * world, []

    def make_all_reduce(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = torch.stack(slots).sum(0)
            barrier.wait()  # everyone has read the slots before they are reused
            return total
        return all_reduce

    def target(rank):
        try:
            results[rank] = fn(rank, make_all_reduce(rank))
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_data_parallel_buffers_stay_identical_and_equal_the_global_batch():
    torch.manual_seed(0)
    config = QuantizerConfig(codebook_size=6, code_dim=2, ema=True, ema_decay=0.7, dead_code_steps=2)
    base = VectorQuantizer(config).train()
    with torch.no_grad():
        init = torch.randn(6, 2)
        init[4:] += 50.0  # never used: restarted after 2 steps
        base.codebook.copy_(init)
        base.embed_sum.copy_(init)
    batches = [[torch.randn(1, 2, 3, 3) for _ in range(4)] for _ in range(2)]  # rank -> steps

    def rank_fn(rank, all_reduce):
        q = VectorQuantizer(config).train()
        q.load_state_dict(base.state_dict())
        for z in batches[rank]:
            out = q(z, all_reduce=all_reduce, rank=rank)
        return q.state_dict(), out.stats

    (s0, st0), (s1, st1) = _run_ranks(rank_fn, 2)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert st0["restarted"].item() == st1["restarted"].item()
    # Without restarts, the EMA statistics equal one quantiser fed the global batch.
    config_nr = QuantizerConfig(codebook_size=6, code_dim=2, ema=True, ema_decay=0.7)
    single = VectorQuantizer(config_nr).train()
    single.load_state_dict(base.state_dict())

    def rank_fn_nr(rank, all_reduce):
        q = VectorQuantizer(config_nr).train()
        q.load_state_dict(base.state_dict())
        for z in batches[rank]:
            q(z, all_reduce=all_reduce, rank=rank)
        return q.state_dict()

    d0, _ = _run_ranks(rank_fn_nr, 2)
    for z0, z1 in zip(*batches):
        single(torch.cat([z0, z1]))
    for key in ("codebook", "cluster_size", "embed_sum", "steps_unused"):
        assert torch.allclose(d0[key].float(), single.state_dict()[key].float(), atol=1e-6), key


def tiny_vq_config(**q) -> AutoencoderVQConfig:
    ae = AutoencoderConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    return AutoencoderVQConfig(ae, QuantizerConfig(**{"codebook_size": 16, "code_dim": 3, **q}))


def test_autoencoder_vq_shapes_and_latent_interface():
    torch.manual_seed(0)
    model = AutoencoderVQ(tiny_vq_config(ema=True)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.recon.shape == x.shape and out.indices.shape == (2, 8, 8) and out.vq_loss.ndim == 0
    assert model.config.latent_shape == (3, 8, 8)
    h = model.encode(x)  # pre-quantisation latent, what diffusion trains on
    assert h.shape == (2, 3, 8, 8)
    cb = model.quantize.codebook.clone()
    recon = model.decode(h)  # quantises first, and never updates the codebook, even in train mode
    assert torch.equal(model.quantize.codebook, cb)
    q = model.quantize(h, update=False)
    assert torch.allclose(recon, model.decode_quantized(q.z_q))
    # same codes, same decoder; tolerance for conv kernels chosen by thread count (1e-6 failed under load)
    assert torch.allclose(model.decode_indices(q.indices), recon, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.decode(h, quantize=False), recon)
    # Gradients reach the encoder through the straight-through estimator.
    model.zero_grad()
    model(x).recon.square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.last_layer is model.decoder.conv_out.weight
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="^h:"):
        model.decode(torch.zeros(1, 4, 8, 8))


def test_vq_config_validation_and_round_trip():
    c = tiny_vq_config(l2_normalize=True)
    assert AutoencoderVQConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="^codebook_size:"):
        AutoencoderVQConfig.from_dict({"quantizer": {"codebook_size": 0}})
    with pytest.raises(ValueError, match="unknown keys"):
        AutoencoderVQConfig.from_dict({"quantiser": {}})
    with pytest.raises(ValueError, match="^quantizer:"):
        AutoencoderVQConfig(quantizer=3)


def test_save_load_and_family_registry(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderVQ(tiny_vq_config(ema=True, dead_code_steps=4)).train()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    model(x)  # move the EMA buffers away from their init
    save_pretrained(model, tmp_path / "vq", extra={"scale": 0.5})
    loaded, extra = load_pretrained(tmp_path / "vq")
    assert extra == {"scale": 0.5} and not loaded.training
    model.eval()
    assert torch.equal(loaded(x).recon, model(x).recon)
    # The registry picks either family by name and loads either kind of directory.
    assert set(AUTOENCODER_FAMILIES) == {"kl", "vq"}
    vq = build_autoencoder("vq", tiny_vq_config().to_dict())
    assert isinstance(vq, AutoencoderVQ)
    kl_config = AutoencoderConfig(resolution=16, ch=8, ch_mult=(1, 2))
    kl = build_autoencoder("kl", kl_config.to_dict())
    assert isinstance(kl, AutoencoderKL)
    save_kl(kl, tmp_path / "kl")
    assert isinstance(load_autoencoder(tmp_path / "kl")[0], AutoencoderKL)
    assert isinstance(load_autoencoder(tmp_path / "vq")[0], AutoencoderVQ)
    with pytest.raises(ValueError, match="^family:"):
        build_autoencoder("vqgan", {})
