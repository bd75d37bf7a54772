"""Contract tests shared by every baseline family (models/baselines): tiny sizes, CPU, seconds each."""
from __future__ import annotations

import math

import pytest
import torch

from models.baselines import BASELINES, NoLikelihood, baseline_class, build_baseline
from models.baselines.base import density_nats_to_bpd, dequantize, to_8bit

RES = 8
# Tiny configs per family (in_channels 3, 8x8); each family's own fields are kept small.
TINY = {
    "ppca": {"latent_dim": 4},
    "vae": {"ch": 8, "latent_dim": 4},
    "vqvae": {"ch": 8, "codebook_size": 16, "code_dim": 4, "prior_ch": 8, "prior_layers": 2},
    "pixelcnn": {"ch": 8, "num_layers": 2},
    "imagegpt": {"width": 16, "depth": 1, "heads": 2, "levels": 8},
    "dcgan": {"ch": 8, "z_dim": 8},
    "stylegan": {"ch": 8, "z_dim": 8, "w_dim": 8, "mapping_layers": 2},
    "glow": {"hidden": 8, "num_scales": 2, "steps_per_scale": 2},
    "ddpm": {"ch": 8, "timesteps": 20, "sample_steps": 4},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


def _model(family, **kw):
    torch.manual_seed(0)
    return build_baseline(family, {"in_channels": 3, "resolution": RES, **TINY[family], **kw})


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (n, 3, RES, RES), generator=g)
    return p.float() / 127.5 - 1


def test_registry_lists_every_family_and_rejects_unknown():
    assert set(BASELINES) == set(TINY)
    with pytest.raises(ValueError, match="family: unknown baseline 'gpt5'"):
        baseline_class("gpt5")


@pytest.mark.parametrize("family", sorted(TINY))
def test_config_round_trip_and_unknown_field(family):
    m = _model(family)
    cls = baseline_class(family)
    assert cls.Config.from_dict(m.config.to_dict()) == m.config
    with pytest.raises(ValueError, match="^not_a_field: unknown field"):
        cls.Config.from_dict({**m.config.to_dict(), "not_a_field": 1})
    with pytest.raises(ValueError, match="^resolution: expected a positive int"):
        cls.Config.from_dict({**m.config.to_dict(), "resolution": 0})


@pytest.mark.parametrize("family", sorted(TINY))
def test_trains_samples_and_scores(family):
    """A few steps change the weights and give finite logs; samples have the data's shape and range
    and are reproducible from a seed; bits/dim is finite and positive, or NoLikelihood."""
    m = _model(family)
    x = _batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    closed = m.fit_closed_form(iter([x, _batch(seed=1)]))
    if closed is None:
        opts = m.make_optimizers()
        for step in range(3):
            logs = m.train_step(x, opts, step)
            assert logs and all(math.isfinite(float(v)) for v in logs.values()), logs
    else:
        assert all(math.isfinite(float(v)) for v in closed.values())
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items()), "nothing was learned"
    m.eval()
    s1 = m.sample(3, generator=torch.Generator().manual_seed(7))
    s2 = m.sample(3, generator=torch.Generator().manual_seed(7))
    assert s1.shape == (3, 3, RES, RES) and s1.dtype == torch.float32
    assert torch.isfinite(s1).all() and s1.min() >= -1 and s1.max() <= 1
    assert torch.equal(s1, s2)
    if m.has_likelihood:
        assert m.likelihood_kind in ("exact", "bound")
        bpd = m.bits_per_dim(x)
        assert bpd.shape == (x.shape[0],) and torch.isfinite(bpd).all() and (bpd > 0).all()
    else:
        assert m.likelihood_kind == "n/a"
        with pytest.raises(NoLikelihood):
            m.bits_per_dim(x)


@pytest.mark.parametrize("family", sorted(TINY))
def test_state_dict_reload_gives_the_same_samples(family):
    m = _model(family)
    x = _batch()
    if m.fit_closed_form(iter([x])) is None:
        opts = m.make_optimizers()
        m.train_step(x, opts, 0)
    m.eval()
    m2 = _model(family)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    g = lambda: torch.Generator().manual_seed(3)   # noqa: E731
    assert torch.equal(m.sample(2, generator=g()), m2.sample(2, generator=g()))


def test_bpd_helpers_golden_values():
    # A uniform density on [-1, 1]^D (log p = -D log 2) is exactly 8 bits per 8-bit dimension.
    D = 12
    nll = torch.tensor([D * math.log(2.0)])
    assert density_nats_to_bpd(nll, D).item() == pytest.approx(8.0)
    x = _batch()
    assert torch.equal(to_8bit(x), torch.round((x + 1) * 127.5).long())
    d = dequantize(x, torch.Generator().manual_seed(0))
    assert (d >= -1).all() and (d < 1).all()
    assert torch.equal(torch.floor((d + 1) * 128).long(), to_8bit(x))   # stays in its own bin


@pytest.mark.parametrize("family", sorted(TINY))
def test_training_state_loads_with_weights_only(family):
    """train_baseline's checkpoint (state.pt: model + every optimizer after a step; rng_rank*.pt)
    reads back with torch.load(weights_only=True): no pickled code runs on resume."""
    import io
    m = build_baseline(family, TINY[family])
    opts = m.make_optimizers()
    for o in opts.values():
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        o.step()
    buf, rng = io.BytesIO(), torch.get_rng_state()
    torch.save({"model": m.state_dict(), "opts": {k: o.state_dict() for k, o in opts.items()}, "rng": rng}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_baseline(family, TINY[family])
    fresh.load_state_dict(state["model"])
    for k, o in fresh.make_optimizers().items():
        o.load_state_dict(state["opts"][k])
        assert o.state_dict()["state"].keys() == opts[k].state_dict()["state"].keys()
    assert torch.equal(state["rng"], rng)
