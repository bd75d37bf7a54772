"""Our `UNet` <-> diffusers' `UNet2DConditionModel`: configs, state dicts, whole models.

Both are the LDM U-Net; only names differ. The block layout lines up one to one:

    ours                                   diffusers
    time_embed.0 / .2                      time_embedding.linear_1 / linear_2
    input_blocks.0.0                       conv_in
    input_blocks.k.0 / .1 (level l, j)     down_blocks.l.resnets.j / attentions.j
    input_blocks.k.0 (after level l)       down_blocks.l.downsamplers.0
    middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.k.0 / .1 (up block i, j) up_blocks.i.resnets.j / attentions.j
    output_blocks.k.<last> (j = last)      up_blocks.i.upsamplers.0
    out_norm / out_conv                    conv_norm_out / conv_out

and inside the blocks ResBlock (in_norm, in_conv, emb_proj, out_norm, out_conv, skip) is
ResnetBlock2D (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut), GEGLU
(proj_in, proj_out) is FeedForward (net.0.proj, net.2), the rest keeps its name.

Things to know when comparing the two:
- diffusers calls the number of heads `attention_head_dim` in SD-1-style configs (its
  own documented misnomer); `num_attention_heads` must stay None there.
- diffusers' `encoder_attention_mask` is 1 = keep, 0 = drop, turned into a -10000
  bias; ours is a (B, L) bool with True = keep. Pass `mask.float()` to diffusers.
  In float32 exp(-10000) is exactly 0, so the two agree while a sample keeps a key.
- diffusers applies `dropout` in the ResNets only; ours also in attention and the
  feed-forward. Identical in eval mode, which is what conversion is for.
- SD 1.x transformers use 1x1 conv projections (use_linear_projection=False); a
  1x1 conv is our linear layer with the weight reshaped (C, C, 1, 1) -> (C, C), so
  those checkpoints load, and convert back with use_linear_projection=True.
- `upcast_attention` (SD 2.1) and `sample_size` are accepted and dropped: the first
  only chooses the precision of the attention scores (our SDPA/math kernels
  accumulate in float32 anyway), the second is a default image size, not weights.

diffusers is imported only inside `unet_to_diffusers`, `unet_from_diffusers` and
`unet_config_from_diffusers` (for its defaults).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from models.unet import UNet, UNetConfig

if TYPE_CHECKING:  # only for annotations: diffusers is a test/conversion dependency
    from diffusers import UNet2DConditionModel

__all__ = [
    "diffusers_unet_kwargs",
    "unet_config_from_diffusers",
    "unet_to_diffusers",
    "unet_from_diffusers",
    "unet_state_dict_to_diffusers",
    "unet_state_dict_from_diffusers",
]

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"

# diffusers settings we have no counterpart for, with the one value we can represent
# (usually its default). Anything else is refused by name rather than converted to a
# net that computes something different.
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,  # our embedding is [cos, sin]
    "freq_shift": 0,
    "mid_block_type": _MID,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers itself refuses it for this class; heads go in attention_head_dim
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

_NUM_HEADS_DEFAULT = UNetConfig.__dataclass_fields__["num_heads"].default

_TIME_SCALE_SHIFT = {"scale_shift": "scale_shift", "additive": "default"}  # ours -> diffusers


# ----------------------------------------------------------------------------------------------
# configs


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """Keyword arguments for `UNet2DConditionModel(**kwargs)` computing the same function as `UNet(cfg)`.

    Raises ValueError naming the field when cfg has no diffusers equivalent:
    channel_mult[0] != 1 (diffusers' conv_in and time embedding are block_out_channels[0]
    wide, ours `channels` wide) or norm_groups not dividing every width (diffusers has
    one group count; ours falls back to gcd(norm_groups, width)).
    """
    if cfg.channel_mult[0] != 1:
        raise ValueError(
            f"channel_mult: diffusers' first level is as wide as conv_in and the time embedding input; "
            f"expected channel_mult[0] == 1, got {cfg.channel_mult}"
        )
    widths = [cfg.channels * m for m in cfg.channel_mult]
    if any(w % cfg.norm_groups for w in widths):
        raise ValueError(
            f"norm_groups: diffusers uses norm_num_groups for every GroupNorm; {cfg.norm_groups} must divide "
            f"every level width {widths}"
        )
    levels = range(len(cfg.channel_mult))
    attn = set(cfg.attention_levels)
    if cfg.head_dim is None:
        heads: int | tuple[int, ...] = cfg.num_heads
    else:
        # Per-level head counts; levels without attention ignore theirs (any positive int).
        heads = tuple(max(w // cfg.head_dim, 1) for w in widths)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(_CROSS_DOWN if lv in attn else _PLAIN_DOWN for lv in levels),
        mid_block_type=_MID,
        up_block_types=tuple(_CROSS_UP if lv in attn else _PLAIN_UP for lv in reversed(levels)),
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=heads,  # diffusers' name for the number of heads (see module docstring)
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        dropout=cfg.dropout,
        resnet_time_scale_shift=_TIME_SCALE_SHIFT[cfg.time_conditioning],
        use_linear_projection=True,
        only_cross_attention=False,
        upcast_attention=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        conv_in_kernel=3,
        conv_out_kernel=3,
        time_embedding_type="positional",
    )


def _diffusers_defaults() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _one(name: str, value: Any, n: int) -> Any:
    """A per-level setting that we hold as one value: an int, or a list of n equal ones."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(map(repr, value))) != 1:
            raise ValueError(f"{name}: expected one value for every level, got {list(value)}")
        value = value[0]
    return value


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Our `UNetConfig` for a `UNet2DConditionModel` config (its `.config`, or its config.json as a dict).

    Keys left out take diffusers' defaults (so a bare SD 1.x config.json means additive
    time conditioning and conv projections). Raises ValueError naming the first diffusers
    setting that our U-Net cannot represent.
    """
    c = {**_diffusers_defaults(), **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, want in _FIXED.items():
        if c.get(key, want) != want:
            raise ValueError(f"{key}: only {want!r} can be converted, got {c[key]!r}")
    if c.get("mid_block_only_cross_attention") not in (None, False):
        raise ValueError(f"mid_block_only_cross_attention: only None or False can be converted, got "
                         f"{c['mid_block_only_cross_attention']!r}")

    widths = list(c["block_out_channels"])
    n = len(widths)
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels: expected multiples of the first width, got {widths}")
    mult = tuple(w // widths[0] for w in widths)

    down = list(c["down_block_types"])
    if len(down) != n or any(t not in (_CROSS_DOWN, _PLAIN_DOWN) for t in down):
        raise ValueError(f"down_block_types: expected {n} of {_CROSS_DOWN}, {_PLAIN_DOWN}; got {down}")
    attention_levels = tuple(i for i, t in enumerate(down) if t == _CROSS_DOWN)
    up_expected = [_CROSS_UP if t == _CROSS_DOWN else _PLAIN_UP for t in reversed(down)]
    if list(c["up_block_types"]) != up_expected:
        raise ValueError(f"up_block_types: expected the mirror of down_block_types {up_expected}, "
                         f"got {list(c['up_block_types'])}")
    if _one("only_cross_attention", c["only_cross_attention"], n) is not False:
        raise ValueError(f"only_cross_attention: only False can be converted, got {c['only_cross_attention']!r}")

    time_conditioning = {v: k for k, v in _TIME_SCALE_SHIFT.items()}.get(c["resnet_time_scale_shift"])
    if time_conditioning is None:
        raise ValueError(f"resnet_time_scale_shift: expected 'default' or 'scale_shift', got "
                         f"{c['resnet_time_scale_shift']!r}")
    groups = c["norm_num_groups"]
    if groups is None:
        raise ValueError("norm_num_groups: None (no output norm) cannot be converted")

    # Heads: one count everywhere (SD 1), or one head width everywhere (SD 2's 64).
    # Only levels with attention, and the middle (which uses the last level's), matter.
    heads = c["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    if len(heads) != n:
        raise ValueError(f"attention_head_dim: expected {n} head counts, got {heads}")
    used = sorted({*attention_levels, n - 1})
    # With head_dim set num_heads is unused: leave UNetConfig's default there.
    num_heads, head_dim = _NUM_HEADS_DEFAULT, None
    if len({heads[i] for i in used}) == 1:
        num_heads = heads[used[0]]
    elif all(widths[i] % heads[i] == 0 for i in used) and len({widths[i] // heads[i] for i in used}) == 1:
        head_dim = widths[used[0]] // heads[used[0]]
    else:
        raise ValueError(f"attention_head_dim: neither one head count nor one head width over the levels "
                         f"{used} (widths {[widths[i] for i in used]}, heads {[heads[i] for i in used]})")

    depth = c["transformer_layers_per_block"]
    if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError(f"transformer_layers_per_block: per-block depths cannot be converted, got {depth}")

    return UNetConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        channels=widths[0],
        channel_mult=mult,
        num_res_blocks=_one("layers_per_block", c["layers_per_block"], n),
        attention_levels=attention_levels,
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=_one("cross_attention_dim", c["cross_attention_dim"], n),
        transformer_depth=_one("transformer_layers_per_block", depth, n),
        dropout=c["dropout"],
        time_conditioning=time_conditioning,
        norm_groups=groups,
        norm_eps=c["norm_eps"],
    )


# ----------------------------------------------------------------------------------------------
# state dicts

# Parameter names inside each kind of block, ours <-> diffusers, most specific first.
# "{n}" stands for a transformer block index.
_RULES: dict[str, list[tuple[str, str]]] = {
    "res": [
        ("in_norm.", "norm1."),
        ("in_conv.", "conv1."),
        ("emb_proj.", "time_emb_proj."),
        ("out_norm.", "norm2."),
        ("out_conv.", "conv2."),
        ("skip.", "conv_shortcut."),
    ],
    "attn": [
        ("blocks.{n}.ff.proj_in.", "transformer_blocks.{n}.ff.net.0.proj."),
        ("blocks.{n}.ff.proj_out.", "transformer_blocks.{n}.ff.net.2."),
        ("blocks.{n}.", "transformer_blocks.{n}."),  # norm1-3, attn1/2.to_q/k/v/out.0: same names
        ("norm.", "norm."),
        ("proj_in.", "proj_in."),
        ("proj_out.", "proj_out."),
    ],
    "conv": [("conv.", "conv.")],  # Downsample / Upsample hold one conv in both
    "leaf": [("", "")],  # a bare layer: weight, bias
}


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)"))


_COMPILED = {kind: [(_compile(a), _compile(b), a, b) for a, b in rules] for kind, rules in _RULES.items()}


def _block_map(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """Our module path -> (diffusers module path, kind) for every block of UNet(cfg)."""
    m: dict[str, tuple[str, str]] = {
        "time_embed.0": ("time_embedding.linear_1", "leaf"),
        "time_embed.2": ("time_embedding.linear_2", "leaf"),
        "input_blocks.0.0": ("conv_in", "leaf"),
        "out_norm": ("conv_norm_out", "leaf"),
        "out_conv": ("conv_out", "leaf"),
        "middle_block.0": ("mid_block.resnets.0", "res"),
        "middle_block.1": ("mid_block.attentions.0", "attn"),
        "middle_block.2": ("mid_block.resnets.1", "res"),
    }
    n, nrb, attn = len(cfg.channel_mult), cfg.num_res_blocks, set(cfg.attention_levels)
    k = 1  # input_blocks.0 is conv_in
    for level in range(n):
        for j in range(nrb):
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{j}", "res")
            if level in attn:
                m[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{j}", "attn")
            k += 1
        if level != n - 1:
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", "conv")
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(n))):  # up block i serves level n - 1 - i
        for j in range(nrb + 1):
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", "res")
            if level in attn:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", "attn")
            if level != 0 and j == nrb:
                m[f"output_blocks.{k}.{2 if level in attn else 1}"] = (f"up_blocks.{i}.upsamplers.0", "conv")
            k += 1
    return m


def _rename(key: str, blocks: dict[str, tuple[str, str]], forward: bool) -> str:
    """One parameter name through the block map and its kind's rules (forward = ours -> diffusers)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest block path first; the last part is weight/bias
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            target, kind = blocks[prefix]
            suffix = ".".join(parts[cut:]) + "."
            for ours, theirs, ours_t, theirs_t in _COMPILED[kind]:
                src, dst = (ours, theirs_t) if forward else (theirs, ours_t)
                if match := src.match(suffix):
                    renamed = dst.replace("{n}", match["n"]) if "{n}" in dst else dst
                    return f"{target}.{renamed}{suffix[match.end():]}".rstrip(".")
            break
    side = "our" if forward else "diffusers"
    raise ValueError(f"state_dict: {key!r} is not a {side} U-Net parameter for this config")


def unet_state_dict_to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet(cfg) state dict -> the equivalent `UNet2DConditionModel(**diffusers_unet_kwargs(cfg))` one.

    Tensors are passed through (not copied). Raises ValueError on a key UNet(cfg) does not have."""
    blocks = _block_map(cfg)
    return {_rename(k, blocks, forward=True): v for k, v in state.items()}


def unet_state_dict_from_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A `UNet2DConditionModel` state dict -> ours for UNet(cfg), cfg as from `unet_config_from_diffusers`.

    1x1 conv transformer projections (use_linear_projection=False) become linear
    weights: (C, C, 1, 1) -> (C, C). Raises ValueError on a key with no counterpart."""
    inverse = {theirs: (ours, kind) for ours, (theirs, kind) in _block_map(cfg).items()}
    out = {}
    for key, value in state.items():
        name = _rename(key, inverse, forward=False)
        if re.search(r"\.proj_(in|out)\.weight$", name) and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                raise ValueError(f"state_dict: {key!r} is a {tuple(value.shape[2:])} conv; only 1x1 projections convert")
            value = value[:, :, 0, 0]  # a view; the load copies it
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# models


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def unet_to_diffusers(unet: UNet) -> UNet2DConditionModel:
    """A diffusers `UNet2DConditionModel` with our weights, on our device and dtype.

    Call it as `model(x, t, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample`."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**diffusers_unet_kwargs(unet.config))
    model.load_state_dict(unet_state_dict_to_diffusers(unet.state_dict(), unet.config), strict=True)
    device, dtype = _device_dtype(unet)
    model.to(device)
    if dtype != next(model.parameters()).dtype:  # diffusers warns on any dtype cast, even a no-op one
        model.to(dtype)
    return model.train(unet.training)


def unet_from_diffusers(model: UNet2DConditionModel) -> UNet:
    """Our `UNet` with a diffusers `UNet2DConditionModel`'s config and weights (device and dtype kept).

    Raises ValueError naming the diffusers setting when its config cannot be represented."""
    cfg = unet_config_from_diffusers(model.config)
    unet = UNet(cfg)
    unet.load_state_dict(unet_state_dict_from_diffusers(model.state_dict(), cfg), strict=True)
    device, dtype = _device_dtype(model)
    return unet.to(device=device, dtype=dtype).train(model.training)
