"""The CLIP text-encoder pretraining: open_clip's CLIP + ClipLoss, and the hand-over of its text tower."""
import numpy as np
import pytest
import torch

from models.clip import VisionTowerConfig, build_clip, clip_text_cfg, encode_pair, text_encoder_from_clip
from models.text import TextEncoderConfig

TEXT = TextEncoderConfig(model="ViT-B-32", context_length=8, layers=1, width=32, heads=2)
VISION = VisionTowerConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16)


def test_text_encoder_from_clip_gives_the_clip_text_states():
    clip = build_clip(TEXT, VISION).eval()
    enc = text_encoder_from_clip(clip, TEXT).eval()
    tokens = enc.tokenize(["a red circle", "two blue squares"])
    states, mask = enc(tokens)
    # CLIP's own per-token states: its text path up to ln_final (encode_text pools after that).
    with torch.no_grad():
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    assert torch.allclose(states, x, atol=1e-5)
    assert mask[0].sum() == 5   # SOT, a, red, circle, EOT


def test_vision_and_text_config_errors_name_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        VisionTowerConfig(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="pretrained"):
        clip_text_cfg(TextEncoderConfig(model="ViT-B-32", pretrained="/nonexistent.pt"))


def test_contrastive_training_separates_captions():
    """A few dozen steps of ClipLoss on 4 colour/caption pairs: retrieval goes from chance to exact."""
    from open_clip.loss import ClipLoss
    torch.manual_seed(0)
    clip = build_clip(TEXT, VISION)
    enc = text_encoder_from_clip(clip, TEXT)
    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
    captions = [f"a {c} square" for c in colours]
    images = torch.tensor(list(colours.values()), dtype=torch.float32)[:, :, None, None].expand(-1, 3, 16, 16)
    images = images + 0.1 * torch.randn(4, 3, 16, 16)
    tokens = enc.tokenize(captions)
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    loss_fn = ClipLoss()
    first = None
    for _ in range(60):
        img_f, txt_f, scale = encode_pair(clip, images, tokens)
        loss = loss_fn(img_f, txt_f, scale)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        img_f, txt_f, _ = encode_pair(clip.eval(), images, tokens)
    assert ((img_f @ txt_f.T).argmax(1) == torch.arange(4)).all()
    # and the trained tower, as a TextEncoder, now tells the captions apart
    states, _ = text_encoder_from_clip(clip, TEXT).encode(captions)
    assert not np.allclose(states[0, 2].numpy(), states[1, 2].numpy(), atol=1e-3)
