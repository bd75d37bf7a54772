"""TextEncoder on tiny open_clip text towers (CPU, random init; no network)."""

import json

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")

from models.text import TextEncoder, TextEncoderConfig, load_text_encoder, save_text_encoder  # noqa: E402

TINY = dict(layers=2, width=64, heads=2, context_length=16)
TINY_MODEL = "ldmflow-test-tiny-clip"  # registered below: a whole (tiny) open_clip CLIP


@pytest.fixture(scope="module")
def tiny():
    return TextEncoder(TextEncoderConfig(**TINY))


@pytest.fixture(scope="module")
def tiny_clip_model(tmp_path_factory):
    """Register a tiny model config with open_clip, so that a genuine full-CLIP checkpoint (vision
    tower, projection and all) is cheap to create and save."""
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
    }
    path = tmp_path_factory.mktemp("oc_cfg") / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_MODEL


def test_shapes_and_width(tiny):
    states, mask = tiny.encode(["a photo of a cat", "a dog"])
    assert tiny.width == 64
    assert states.shape == (2, 16, 64) and states.dtype == torch.float32
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    assert torch.isfinite(states).all()
    assert tiny.tokenize(["x"]).shape == (1, 16)


def test_mask_marks_real_tokens(tiny):
    tokens = tiny.tokenize(["", "a photo of a cat", "word " * 40, "!#%&"])
    _, mask = tiny(tokens)
    assert mask[0].tolist() == [True, True] + [False] * 14  # empty caption: SOT + EOT
    n_bpe = len(tiny.tokenizer.encode("a photo of a cat"))
    assert mask[1].sum().item() == n_bpe + 2 and mask[1, : n_bpe + 2].all()
    assert mask[2].all()  # truncated, EOT kept in the last slot
    # "!" (not word-final) is BPE id 0, the same as padding: the mask must still count it.
    assert (tokens[3, 1:5] == 0).any() and mask[3].sum().item() == 6


def test_deterministic_per_seed_and_caption_dependent(tiny):
    same = TextEncoder(TextEncoderConfig(**TINY))
    other = TextEncoder(TextEncoderConfig(**TINY, seed=1))
    caps = ["a cat", "a dog"]
    s0, _ = tiny.encode(caps)
    assert torch.equal(same.encode(caps)[0], s0)
    assert not torch.allclose(other.encode(caps)[0], s0)
    # [SOT, a, cat|dog, EOT]: causal attention, so positions before the first difference agree.
    assert torch.equal(s0[0, :2], s0[1, :2])
    assert not torch.allclose(s0[0, 2:4], s0[1, 2:4])
    # seeding must not disturb the caller's RNG stream
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    TextEncoder(TextEncoderConfig(**TINY))
    assert torch.equal(torch.rand(1), a)


def test_penultimate_layer(tiny):
    pen = TextEncoder(TextEncoderConfig(**TINY, layer="penultimate"))
    assert len(pen.tower.transformer.resblocks) == 1  # last block pruned, never run
    s_last, _ = tiny.encode(["a cat"])
    s_pen, _ = pen.encode(["a cat"])
    assert s_pen.shape == s_last.shape and not torch.allclose(s_pen, s_last)


def test_encode_is_no_grad_forward_is_differentiable(tiny):
    states, _ = tiny.encode(["a cat"])
    assert not states.requires_grad
    states, _ = tiny(tiny.tokenize(["a cat"]))
    states.sum().backward()
    assert tiny.tower.token_embedding.weight.grad is not None
    tiny.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="^tokens:"):
        tiny(torch.zeros(1, 16, dtype=torch.long))  # no EOT
    with pytest.raises(ValueError, match="^tokens:"):
        tiny(tiny.tokenize(["a"])[:, :8])


def test_save_load_round_trip(tiny, tmp_path):
    save_text_encoder(tiny, tmp_path / "enc", extra={"note": "test"})
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["layers"] == 2
    loaded = load_text_encoder(tmp_path / "enc")
    assert loaded.config == tiny.config
    caps = ["a photo of a cat", ""]
    assert torch.equal(loaded.encode(caps)[0], tiny.encode(caps)[0])
    # penultimate: the pruned architecture is rebuilt before the saved weights load
    pen = TextEncoder(TextEncoderConfig(**TINY, layer="penultimate", seed=3))
    save_text_encoder(pen, tmp_path / "pen")
    assert torch.equal(load_text_encoder(tmp_path / "pen").encode(caps)[0], pen.encode(caps)[0])


def test_config_validation():
    assert TextEncoderConfig.from_dict(TextEncoderConfig(**TINY).to_dict()) == TextEncoderConfig(**TINY)
    with pytest.raises(ValueError, match="^layers:"):
        TextEncoderConfig(pretrained="openai", layers=2)
    with pytest.raises(ValueError, match="^width:"):
        TextEncoderConfig(pretrained="/some/file.safetensors", width=64)
    with pytest.raises(ValueError, match="^model:"):
        TextEncoderConfig(model="no-such-model")
    with pytest.raises(ValueError, match="^model:"):
        TextEncoderConfig(model="hf-hub:org/repo")  # would go to the network
    with pytest.raises(ValueError, match="^context_length:"):
        TextEncoderConfig(context_length=78)
    with pytest.raises(ValueError, match="^context_length:"):
        TextEncoderConfig(context_length=1)
    with pytest.raises(ValueError, match="^heads:"):
        TextEncoderConfig(width=64, heads=3)
    with pytest.raises(ValueError, match="^layer:"):
        TextEncoderConfig(layer="middle")
    with pytest.raises(ValueError, match="^layer:"):
        TextEncoderConfig(layers=1, width=64, heads=2, layer="penultimate")
    with pytest.raises(ValueError, match="^pretrained:"):
        TextEncoderConfig(pretrained="")
    with pytest.raises(ValueError, match="unknown"):
        TextEncoderConfig.from_dict({"model": "ViT-B-32", "depth": 2})


def test_pretrained_errors_are_clear_and_offline(monkeypatch, tmp_path):
    # neither a tag nor a file: fails before any network access
    with pytest.raises(ValueError, match="^pretrained: .*neither an open_clip tag"):
        TextEncoder(TextEncoderConfig(pretrained=str(tmp_path / "missing.safetensors")))

    # a real tag whose download fails: wrapped, naming `pretrained` and suggesting a local path
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_network)
    with pytest.raises(RuntimeError, match=r"^pretrained: could not fetch .*'openai'.*local path"):
        TextEncoder(TextEncoderConfig(pretrained="openai", context_length=16))


def _clip_states(clip, tokens77, layer_index):
    out = clip.forward_intermediates(
        text=tokens77, text_indices=[layer_index], normalize_intermediates=True, intermediates_only=True
    )
    return out["text_intermediates"][0]


def test_local_checkpoint_loading(tiny_clip_model, tmp_path):
    # 1) our own random-init tower saved as open_clip checkpoints, in both key layouts -> identical
    src = TextEncoder(TextEncoderConfig(model=tiny_clip_model, context_length=16, seed=5))
    sd = {k: v.contiguous() for k, v in src.tower.state_dict().items()}
    save_file(sd, str(tmp_path / "clip_layout.safetensors"))  # CLIP: text keys at top level
    torch.save({"state_dict": {"module.text." + k: v for k, v in sd.items()}}, tmp_path / "custom_text.pt")
    caps = ["a photo of a cat", "", "two dogs"]
    ref = src.encode(caps)[0]
    for name in ("clip_layout.safetensors", "custom_text.pt"):
        cfg = TextEncoderConfig(model=tiny_clip_model, context_length=16, pretrained=str(tmp_path / name))
        assert torch.equal(TextEncoder(cfg).encode(caps)[0], ref), name

    # 2) a whole open_clip CLIP checkpoint (vision tower, text projection, 77 positions): our
    #    16-token states equal open_clip's own CLIP.forward_intermediates on 77 tokens.
    clip = open_clip.create_model(tiny_clip_model, pretrained=None).eval()
    torch.save(clip.state_dict(), tmp_path / "full_clip.bin")
    tokens77 = open_clip.get_tokenizer(tiny_clip_model)(caps)  # all fit in 16 tokens
    for layer, index in (("last", -1), ("penultimate", -2)):
        cfg = TextEncoderConfig(
            model=tiny_clip_model, context_length=16, pretrained=str(tmp_path / "full_clip.bin"), layer=layer
        )
        enc = TextEncoder(cfg)
        states, mask = enc.encode(caps)
        with torch.no_grad():
            expected = _clip_states(clip, tokens77, index)[:, :16]
        assert torch.allclose(states, expected, atol=1e-5), layer
        assert not any(k.startswith("visual") for k in enc.state_dict())

    # 3) a checkpoint of another architecture: error names `pretrained`
    with pytest.raises(ValueError, match="^pretrained: .*does not match"):
        TextEncoder(TextEncoderConfig(model="ViT-B-32", context_length=16, pretrained=str(tmp_path / "full_clip.bin")))
