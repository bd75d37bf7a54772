"""Caption encoder: an open_clip text tower returning per-token states for cross-attention.

Only the text transformer is built (never the vision tower): from the open_clip model config's
text_cfg, with our overrides applied, via open_clip's own tower builder. Per-token states come
from TextTransformer.forward_intermediates (the same code path CLIP.forward_intermediates uses),
with the final LayerNorm applied.

open_clip is imported inside functions: importing it pulls timm/torchvision/HF (~4 s), which
callers that only build or pass around a TextEncoderConfig should not pay twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import check_int, config_from_dict, config_to_dict, load_state, save_module

__all__ = ["LAYERS", "TextEncoder", "TextEncoderConfig", "load_text_encoder", "save_text_encoder",
           "text_state_from_clip"]

LAYERS = ("last", "penultimate")
# Top-level text-tower keys of an open_clip CLIP (non-custom-text) state dict.
_CLIP_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _model_cfg(model: str) -> dict[str, Any]:
    """The open_clip model config (deep copy) for a built-in name; ValueError naming `model`."""
    import open_clip

    # Schemas (hf-hub:, local-dir:) would make get_model_config fetch over the network or read
    # files; a built-in name is a pure lookup and is what the saved config can rebuild anywhere.
    cfg = None if ":" in model else open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(
            f"model: expected a built-in open_clip model config name (open_clip.list_models()), got {model!r}"
        )
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or "siglip" in model.lower():
        # HF text towers / non-CLIP tokenizers need downloads and a different mask rule (no EOT).
        raise ValueError(f"model: {model!r} does not use open_clip's native text transformer and CLIP BPE tokenizer")
    return cfg


@dataclass
class TextEncoderConfig:
    """Which text tower, and which of its states, condition the denoiser. Saved beside the weights."""

    model: str = "ViT-B-32"  # open_clip model config name; only its text tower is built
    pretrained: str | None = None  # open_clip pretrained tag or local checkpoint path; None = random init
    context_length: int | None = None  # tokens per caption (<= the model's); None = model default (77)
    layers: int | None = None  # override tower depth (pretrained=None only): tiny towers for tests
    width: int | None = None  # override width (pretrained=None only)
    heads: int | None = None  # override attention heads (pretrained=None only)
    seed: int = 0  # init seed when pretrained is None (random init is then reproducible)
    layer: str = "last"  # "last" or "penultimate" (SD2); final LayerNorm applied to either

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise ValueError(f"model: expected a str, got {self.model!r}")
        text_cfg = _model_cfg(self.model)["text_cfg"]
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"pretrained: expected None, a tag or a path, got {self.pretrained!r}")
        max_len = text_cfg.get("context_length", 77)
        if self.context_length is not None:
            check_int("context_length", self.context_length, minimum=2)  # room for SOT + EOT
            if self.context_length > max_len:
                raise ValueError(f"context_length: at most {max_len} for {self.model}, got {self.context_length}")
        for name in ("layers", "width", "heads"):
            v = getattr(self, name)
            if v is None:
                continue
            check_int(name, v)
            if self.pretrained is not None:
                raise ValueError(
                    f"{name}: overrides the architecture, only allowed with pretrained=None "
                    f"(got pretrained={self.pretrained!r})"
                )
        width = self.width or text_cfg.get("width", 512)
        heads = self.heads or text_cfg.get("heads", 8)
        if width % heads:
            raise ValueError(f"heads: width {width} is not divisible by heads {heads}")
        check_int("seed", self.seed, minimum=0)
        if self.layer not in LAYERS:
            raise ValueError(f"layer: expected one of {', '.join(LAYERS)}, got {self.layer!r}")
        if self.layer == "penultimate" and (self.layers or text_cfg.get("layers", 12)) < 2:
            raise ValueError("layer: 'penultimate' needs a tower of at least 2 layers")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextEncoderConfig":
        return config_from_dict(cls, d)


def _resolve_checkpoint(config: TextEncoderConfig) -> str:
    """config.pretrained -> a local checkpoint file: a known tag goes through open_clip's downloader."""
    from open_clip import pretrained as oc_pretrained

    tag = config.pretrained
    tag_cfg = oc_pretrained.get_pretrained_cfg(config.model, tag)
    if tag_cfg:
        try:
            path = oc_pretrained.download_pretrained(tag_cfg)
        except Exception as e:  # network, auth, missing huggingface_hub... all mean "not here"
            raise RuntimeError(
                f"pretrained: could not fetch open_clip weights {config.model!r}/{tag!r} "
                f"({type(e).__name__}: {e}); without network access, download the checkpoint elsewhere "
                "and set pretrained to its local path (.safetensors/.bin/.pt)"
            ) from e
        if not path:
            raise RuntimeError(f"pretrained: open_clip has no download source for {config.model!r}/{tag!r}")
        return path
    if os.path.isfile(tag):
        return tag
    known = oc_pretrained.list_pretrained_tags_by_model(config.model)
    raise ValueError(
        f"pretrained: {tag!r} is neither an open_clip tag for {config.model} (known: {', '.join(known) or 'none'}) "
        "nor an existing checkpoint file"
    )


def _text_state_dict(path: str, context_length: int) -> dict[str, Tensor]:
    """Read the text-tower part of an open_clip checkpoint, keyed like a TextTransformer."""
    from open_clip.factory import load_state_dict

    # .safetensors via safetensors, anything else via torch.load(weights_only=True); strips "module.".
    return text_state_from_clip(load_state_dict(path, device="cpu", weights_only=True), context_length)


def text_state_from_clip(sd: dict[str, Tensor], context_length: int) -> dict[str, Tensor]:
    """The text-tower part of an open_clip CLIP/CustomTextCLIP state dict, keyed like a TextTransformer."""
    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP / CoCa layout
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    else:  # CLIP layout: text tower flattened at top level, beside visual.* (dropped)
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] in _CLIP_TEXT_KEYS}
    # We build without the pooled-embedding projection (unused for per-token states) and the
    # causal mask is a non-persistent buffer in current open_clip, a stale copy in old checkpoints.
    sd = {k: v for k, v in sd.items() if not k.startswith(("text_projection", "attn_mask"))}
    if "positional_embedding" in sd:
        # Truncate positions, don't interpolate (open_clip's resize_text_pos_embed would): with a
        # causal mask, token i never sees positions > i, so the first L states are exactly the
        # full-length model's.
        sd["positional_embedding"] = sd["positional_embedding"][:context_length]
    return sd


class TextEncoder(nn.Module):
    """Captions -> (states (B, L, width), mask (B, L)) from an open_clip text tower.

    load_pretrained=False builds the architecture only (config.pretrained is not fetched):
    load_text_encoder uses it because the saved directory already holds the weights.
    """

    def __init__(self, config: TextEncoderConfig, load_pretrained: bool = True):
        super().__init__()
        from open_clip.model import _build_text_tower
        from open_clip.pretrained import get_pretrained_cfg

        self.config = config
        model_cfg = _model_cfg(config.model)
        text_cfg = dict(model_cfg["text_cfg"])
        self.context_length = config.context_length or text_cfg.get("context_length", 77)
        text_cfg["context_length"] = self.context_length  # (L, L) causal mask, L positions
        for name in ("layers", "width", "heads"):
            if getattr(config, name) is not None:
                text_cfg[name] = getattr(config, name)
        text_cfg["proj_type"] = "none"  # no pooled projection: we return per-token states
        text_cfg["output_tokens"] = False
        # OpenAI weights were trained with QuickGELU but the plain model configs (e.g. ViT-B-32)
        # say GELU; the tag's config knows (open_clip.create_model only warns on the mismatch).
        tag_cfg = get_pretrained_cfg(config.model, config.pretrained) if config.pretrained else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))

        # Fetch/locate the checkpoint first: a bad tag or path fails before the tower is built.
        path = _resolve_checkpoint(config) if load_pretrained and config.pretrained is not None else None

        # Seeded init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            # open_clip's private tower builder (pinned open_clip 3.3): picks norm/act layers from
            # text_cfg exactly as CLIP/CustomTextCLIP do.
            self.tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)

        if path is not None:
            sd = _text_state_dict(path, self.context_length)
            try:
                self.tower.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ValueError(
                    f"pretrained: {path} does not match the text tower of open_clip model {config.model!r}: {e}"
                ) from e

        if config.layer == "penultimate":
            # Drop the last block (open_clip's own pruning) so it is neither run nor trained.
            self.tower.prune_intermediate_layers(indices=[-2], prune_norm=False, prune_head=False)

        self._tokenizer = None
        self.eot_token_id: int | None = None

    @property
    def width(self) -> int:
        """Dimension D of the per-token states."""
        return self.tower.width

    @property
    def tokenizer(self):
        # Lazy: building the BPE tables costs ~0.1 s and is not needed to run on given tokens.
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.config.model, context_length=self.context_length)
        return self._tokenizer

    def tokenize(self, captions: list[str]) -> Tensor:
        """-> (B, L) long on CPU: SOT, BPE tokens, EOT, zero padding; long captions are cut, keeping EOT."""
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of str, got a str")
        return self.tokenizer(list(captions), context_length=self.context_length)

    def _eot_id(self) -> int:
        if self.eot_token_id is None:
            self.eot_token_id = int(self.tokenizer.eot_token_id)
        return self.eot_token_id

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, L) long -> states (B, L, width) in the tower's dtype, mask (B, L) bool.

        mask is True up to and including the first EOT: SOT, caption tokens, EOT. Not
        `tokens != 0`: the padding id 0 is also the real BPE token "!".
        """
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens: expected shape (B, {self.context_length}), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.tower.token_embedding.weight.device)
        is_eot = tokens == self._eot_id()  # (B, L)
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError("tokens: every row needs an EOT token (use TextEncoder.tokenize)")
        eot_pos = is_eot.int().argmax(dim=1)  # (B,) first EOT
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot_pos[:, None]  # (B, L)
        out = self.tower.forward_intermediates(
            tokens,
            indices=1,  # the last remaining block: penultimate of the original if pruned
            normalize_intermediates=True,  # ln_final on the taken block, as SD's encoders do
            intermediates_only=True,  # skip pooling/projection
            output_fmt="NLC",  # the default 'NCHW' is rejected by TextTransformer
        )
        return out["text_intermediates"][0], mask  # (B, L, D), (B, L)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """tokenize + forward without autograd: (B, L, width), (B, L) bool."""
        return self(self.tokenize(captions))


def save_text_encoder(encoder: TextEncoder, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (encoder.config.to_dict()) into directory."""
    return save_module(encoder, encoder.config.to_dict(), directory, extra=extra)


def load_text_encoder(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TextEncoder:
    """Rebuild from config.json and load the saved weights; config.pretrained is not re-fetched."""
    config_dict, state, _extra = load_state(directory, map_location="cpu")
    encoder = TextEncoder(TextEncoderConfig.from_dict(config_dict), load_pretrained=False)
    encoder.load_state_dict(state, strict=True)
    return encoder.to(map_location)
