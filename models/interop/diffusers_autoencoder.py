"""Our `AutoencoderKL` <-> diffusers' `AutoencoderKL` (and `AutoencoderVQ` <-> `VQModel`, at
the end): configs and weights, both ways.

Both follow CompVis LDM's encoder/decoder layer for layer (see models/autoencoder.py),
so the weights map 1:1 and only names differ:

    ours                                   diffusers
    {enc,dec}oder.levels.i.blocks.j.*      encoder.down_blocks.i.resnets.j.* / decoder.up_blocks.i.resnets.j.*
      ...blocks.j.shortcut.*                 ...resnets.j.conv_shortcut.*
    encoder.levels.i.resample.conv.*       encoder.down_blocks.i.downsamplers.0.conv.*
    decoder.levels.i.resample.conv.*       decoder.up_blocks.i.upsamplers.0.conv.*
    *.mid.block_1 / block_2                *.mid_block.resnets.0 / resnets.1
    *.mid.attn_1.norm                      *.mid_block.attentions.0.group_norm
    *.mid.attn_1.qkv  (3C, C, 1, 1)        *.mid_block.attentions.0.to_q / to_k / to_v  (C, C) each
    *.mid.attn_1.proj_out (C, C, 1, 1)     *.mid_block.attentions.0.to_out.0  (C, C)
    *.norm_out                             *.conv_norm_out
    conv_in, conv_out, quant_conv, post_quant_conv: same names

Decoder levels are numbered in execution order (lowest resolution first) on both sides.
The latent scale lives in our checkpoint's extra ("scale_factor") and in diffusers'
config (`scaling_factor`). diffusers is imported inside the functions that build its
models: it is a test-only dependency. Nothing is downloaded.

What diffusers' AutoencoderKL cannot hold raises ValueError naming the setting:
attention outside the middle block (our `attn_resolutions`), dropout, a first level
wider than `ch` (diffusers' conv_in outputs block_out_channels[0]), norm group counts
that differ between levels; from diffusers: other block types, activations, a latent
shift or per-channel latent statistics, out_channels != in_channels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from models.autoencoder import AutoencoderConfig, AutoencoderKL, load_state_checked
from models.autoencoder_vq import AutoencoderVQ, AutoencoderVQConfig
from models.quantize import QuantizerConfig

if TYPE_CHECKING:
    import diffusers

__all__ = [
    "DOWN_BLOCK_TYPE",
    "UP_BLOCK_TYPE",
    "diffusers_autoencoder_kl_kwargs",
    "autoencoder_config_from_diffusers",
    "scale_factor_from_diffusers",
    "autoencoder_kl_state_dict_to_diffusers",
    "autoencoder_kl_state_dict_from_diffusers",
    "autoencoder_kl_to_diffusers",
    "autoencoder_kl_from_diffusers",
    "diffusers_vq_model_kwargs",
    "autoencoder_vq_config_from_diffusers",
    "autoencoder_vq_state_dict_to_diffusers",
    "autoencoder_vq_state_dict_from_diffusers",
    "autoencoder_vq_to_diffusers",
    "autoencoder_vq_from_diffusers",
    "DIFFUSERS_WEIGHTS",
    "read_diffusers_autoencoder",
    "with_fresh_quantizer_state",
]

# The only diffusers blocks with LDM's plain (attention-free) encoder/decoder levels.
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
_ACT_FN = "silu"  # ours is hard-wired to SiLU, as LDM

# diffusers AutoencoderKL config keys we read. force_upcast is only a dtype hint for
# pipelines (decode in float32); it does not change the network, so it is ignored.
_KNOWN_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}


# --------------------------------------------------------------------------- configs


def _check_scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {value!r}")
    return float(value)


def _network_kwargs(config: AutoencoderConfig, model: str) -> dict[str, Any]:
    """The encoder/decoder part of the kwargs, shared by AutoencoderKL and VQModel."""
    if config.attn_resolutions:
        raise ValueError(
            f"attn_resolutions: diffusers' {model} has attention only in the middle block, "
            f"got {list(config.attn_resolutions)}"
        )
    if config.dropout:
        raise ValueError(f"dropout: diffusers' {model} has no dropout, got {config.dropout}")
    if config.ch_mult[0] != 1:
        # LDM's conv_in outputs ch and level 0 widens to ch * ch_mult[0]; diffusers'
        # conv_in outputs block_out_channels[0] directly.
        raise ValueError(f"ch_mult: diffusers' layout needs ch_mult[0] == 1, got {list(config.ch_mult)}")
    # Ours uses gcd(norm_num_groups, width) groups per norm; diffusers one count for all.
    groups = {math.gcd(config.norm_num_groups, w) for w in config.widths}
    if len(groups) != 1:
        raise ValueError(
            f"norm_num_groups: widths {list(config.widths)} get {sorted(groups)} GroupNorm groups here "
            f"(gcd with {config.norm_num_groups}); diffusers uses one count for every norm"
        )
    levels = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=(DOWN_BLOCK_TYPE,) * levels,
        up_block_types=(UP_BLOCK_TYPE,) * levels,
        block_out_channels=config.widths,
        layers_per_block=config.num_res_blocks,
        act_fn=_ACT_FN,
        latent_channels=config.z_channels,
        norm_num_groups=groups.pop(),
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_attention,
    )


def diffusers_autoencoder_kl_kwargs(config: AutoencoderConfig, *, scale_factor: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for `diffusers.AutoencoderKL(**kwargs)` building the same net as `config`.

    scale_factor: the latent scale (our checkpoint's extra["scale_factor"]), written to
    diffusers' `scaling_factor`; 1.0 leaves latents unscaled.
    """
    scale_factor = _check_scale("scale_factor", scale_factor)
    if not config.double_z:
        raise ValueError("double_z: diffusers' AutoencoderKL encoder emits mean and log-variance (double_z=True)")
    return {
        **_network_kwargs(config, "AutoencoderKL"),
        "scaling_factor": scale_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def _get(dconfig: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return dconfig[key] if key in dconfig else default


def _required(dconfig: Mapping[str, Any], key: str) -> Any:
    if key not in dconfig:
        raise ValueError(f"{key}: missing from the diffusers config")
    return dconfig[key]


def _network_config_from_diffusers(dconfig: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """AutoencoderConfig fields for the encoder/decoder of a diffusers AutoencoderKL / VQModel config.

    The network's keys are required (every saved diffusers config has them); settings
    added in later diffusers versions default to their earlier behaviour. Keys starting
    with "_" (diffusers bookkeeping) are ignored, other unknown keys are an error: a
    newer setting might change the network.
    """
    unknown = sorted(k for k in dconfig if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"diffusers config: unknown settings {unknown}")
    act = _required(dconfig, "act_fn")
    if act != _ACT_FN:
        raise ValueError(f"act_fn: only {_ACT_FN!r} maps to our autoencoder, got {act!r}")
    widths = tuple(_required(dconfig, "block_out_channels"))
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"block_out_channels: expected positive ints, got {list(widths)}")
    for key, block in (("down_block_types", DOWN_BLOCK_TYPE), ("up_block_types", UP_BLOCK_TYPE)):
        types = tuple(_required(dconfig, key))
        if types != (block,) * len(widths):
            raise ValueError(f"{key}: expected {len(widths)} x {block!r} (one per block_out_channels), got {list(types)}")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels: every width must be a multiple of the first, got {list(widths)}")
    groups = _required(dconfig, "norm_num_groups")
    if not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
        raise ValueError(f"norm_num_groups: expected a divisor of every width {list(widths)}, got {groups!r}")
    in_channels, out_channels = _required(dconfig, "in_channels"), _required(dconfig, "out_channels")
    if out_channels != in_channels:
        raise ValueError(f"out_channels: our decoder outputs in_channels ({in_channels}), got {out_channels}")
    size = _required(dconfig, "sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"sample_size: expected an int or a square [n, n], got {list(size)}")
        size = size[0]
    f = 2 ** (len(widths) - 1)
    if not isinstance(size, int) or size < 1 or size % f:
        raise ValueError(f"sample_size: expected a positive multiple of the downsampling factor {f}, got {size!r}")
    return dict(
        in_channels=in_channels,
        resolution=size,
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=_required(dconfig, "layers_per_block"),
        attn_resolutions=(),
        mid_attention=bool(_get(dconfig, "mid_block_add_attention", True)),
        z_channels=_required(dconfig, "latent_channels"),
        dropout=0.0,
        norm_num_groups=groups,
    )


def autoencoder_config_from_diffusers(dconfig: Mapping[str, Any]) -> AutoencoderConfig:
    """Our AutoencoderConfig for a diffusers AutoencoderKL config (`model.config` or a plain dict)."""
    fields = _network_config_from_diffusers(dconfig, _KNOWN_DIFFUSERS_KEYS)
    _check_latent_normalisation(dconfig)
    return AutoencoderConfig(**fields, double_z=True)


def _check_latent_normalisation(dconfig: Mapping[str, Any]) -> None:
    # Our pipeline feeds z * scale_factor to diffusion; a shift or per-channel
    # statistics (SD3, SDXL-style configs) would be silently dropped.
    shift = _get(dconfig, "shift_factor")
    if shift not in (None, 0, 0.0):
        raise ValueError(f"shift_factor: our latents are only scaled, not shifted; got {shift!r}")
    for key in ("latents_mean", "latents_std"):
        if _get(dconfig, key) is not None:
            raise ValueError(f"{key}: per-channel latent statistics have no counterpart here; expected None")


def scale_factor_from_diffusers(model_or_config: Any) -> float:
    """diffusers' `scaling_factor` (from a model or its config), for our extra["scale_factor"]."""
    dconfig = getattr(model_or_config, "config", model_or_config)
    _check_latent_normalisation(dconfig)
    if "scaling_factor" not in dconfig:
        raise ValueError("scaling_factor: missing from the diffusers config")
    return _check_scale("scaling_factor", dconfig["scaling_factor"])


# --------------------------------------------------------------------------- state dicts

# (ours, diffusers) key templates. {i}/{j}: level/block indices; {p}: weight|bias;
# {r}: a ResNet block's own layers. Order matters: the shortcut rows precede the
# block rows, whose {r} does not match them anyway.
_RESNET_LAYERS = ("norm1", "conv1", "norm2", "conv2")
_RENAMES: list[tuple[str, str]] = [
    ("encoder.levels.{i}.blocks.{j}.shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("encoder.levels.{i}.blocks.{j}.{r}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{r}.{p}"),
    ("encoder.levels.{i}.resample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    ("decoder.levels.{i}.blocks.{j}.shortcut.{p}", "decoder.up_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("decoder.levels.{i}.blocks.{j}.{r}.{p}", "decoder.up_blocks.{i}.resnets.{j}.{r}.{p}"),
    ("decoder.levels.{i}.resample.conv.{p}", "decoder.up_blocks.{i}.upsamplers.0.conv.{p}"),
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
]
for _net in ("encoder", "decoder"):
    _RENAMES += [
        (f"{_net}.conv_in.{{p}}", f"{_net}.conv_in.{{p}}"),
        (f"{_net}.mid.block_1.{{r}}.{{p}}", f"{_net}.mid_block.resnets.0.{{r}}.{{p}}"),
        (f"{_net}.mid.block_2.{{r}}.{{p}}", f"{_net}.mid_block.resnets.1.{{r}}.{{p}}"),
        (f"{_net}.mid.attn_1.norm.{{p}}", f"{_net}.mid_block.attentions.0.group_norm.{{p}}"),
        # 1x1 conv (C, C, 1, 1) <-> Linear (C, C): reshaped in _convert.
        (f"{_net}.mid.attn_1.proj_out.{{p}}", f"{_net}.mid_block.attentions.0.to_out.0.{{p}}"),
        (f"{_net}.norm_out.{{p}}", f"{_net}.conv_norm_out.{{p}}"),
        (f"{_net}.conv_out.{{p}}", f"{_net}.conv_out.{{p}}"),
    ]
# Fused q/k/v: ours one (3C, C, 1, 1) conv, diffusers three (C, C) Linears, in q, k, v order.
_QKV_OURS = "{net}.mid.attn_1.qkv.{p}"
_QKV_THEIRS = "{net}.mid_block.attentions.0.to_{part}.{p}"
_QKV_PARTS = ("q", "k", "v")

_FIELDS = {"i": r"\d+", "j": r"\d+", "p": "weight|bias", "r": "|".join(_RESNET_LAYERS),
           "net": "encoder|decoder", "part": "|".join(_QKV_PARTS)}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(s) if k % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for k, s in enumerate(parts))
    return re.compile(regex + "$")


_TO_DIFFUSERS = [(_pattern(ours), theirs) for ours, theirs in _RENAMES]
_FROM_DIFFUSERS = [(_pattern(theirs), ours) for ours, theirs in _RENAMES]
_QKV_OURS_RE, _QKV_THEIRS_RE = _pattern(_QKV_OURS), _pattern(_QKV_THEIRS)
_LEVEL_ATTN_RE = re.compile(r"(encoder|decoder)\.levels\.\d+\.attns\.")


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        if m := pattern.match(key):
            return target.format(**m.groupdict())
    return None


def _is_linear_from_conv(name: str) -> bool:
    return ".attentions.0.to_" in name and name.endswith(".weight")


def autoencoder_kl_state_dict_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict -> diffusers AutoencoderKL names and shapes (a pure function)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if _LEVEL_ATTN_RE.match(key):
            raise ValueError(
                f"attn_resolutions: {key!r} is attention outside the middle block; diffusers' AutoencoderKL has none"
            )
        if m := _QKV_OURS_RE.match(key):
            if t.shape[0] % 3:
                raise ValueError(f"{key}: expected 3 * C output channels, got shape {tuple(t.shape)}")
            for part, piece in zip(_QKV_PARTS, t.chunk(3, dim=0)):  # (C, C, 1, 1) or (C,) each
                name = _QKV_THEIRS.format(part=part, **m.groupdict())
                out[name] = piece.flatten(1).clone() if t.ndim == 4 else piece.clone()
            continue
        name = _rename(key, _TO_DIFFUSERS)
        if name is None:
            raise ValueError(f"state_dict: {key!r} has no counterpart in diffusers' AutoencoderKL")
        out[name] = t.flatten(1) if _is_linear_from_conv(name) else t  # (C, C, 1, 1) -> (C, C)
    return out


def autoencoder_kl_state_dict_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ours (a pure function).

    A diffusers model built without quant_conv / post_quant_conv yields a state dict
    without them; `autoencoder_kl_from_diffusers` fills identity convs in.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # our qkv key -> {"q": ..., "k": ..., "v": ...}
    for key, t in state.items():
        if m := _QKV_THEIRS_RE.match(key):
            fields = m.groupdict()
            qkv.setdefault(_QKV_OURS.format(net=fields["net"], p=fields["p"]), {})[fields["part"]] = t
            continue
        name = _rename(key, _FROM_DIFFUSERS)
        if name is None:
            raise ValueError(f"state_dict: {key!r} has no counterpart in our AutoencoderKL")
        out[name] = t[:, :, None, None] if _is_linear_from_conv(key) else t  # (C, C) -> (C, C, 1, 1)
    for name, parts in qkv.items():
        missing = [p for p in _QKV_PARTS if p not in parts]
        if missing:
            raise ValueError(f"state_dict: {name!r} needs to_q, to_k and to_v; missing to_{', to_'.join(missing)}")
        fused = torch.cat([parts[p] for p in _QKV_PARTS], dim=0)  # (3C, C) or (3C,)
        out[name] = fused[:, :, None, None] if fused.ndim == 2 else fused
    return out


# --------------------------------------------------------------------------- models


def _like(module: torch.nn.Module, reference: torch.nn.Module) -> torch.nn.Module:
    p = next(reference.parameters())
    module.to(device=p.device)
    if p.dtype != torch.float32:  # built in float32; a no-op cast would only make diffusers warn
        module.to(dtype=p.dtype)
    return module.eval()


def autoencoder_kl_to_diffusers(model: AutoencoderKL, *, scale_factor: float = 1.0) -> diffusers.AutoencoderKL:
    """A diffusers AutoencoderKL with `model`'s weights (same device and dtype, eval mode).

    scale_factor: our checkpoint's extra["scale_factor"], stored as diffusers' scaling_factor.
    """
    import diffusers

    kwargs = diffusers_autoencoder_kl_kwargs(model.config, scale_factor=scale_factor)
    state = autoencoder_kl_state_dict_to_diffusers(model.state_dict())
    out = diffusers.AutoencoderKL(**kwargs)
    load_state_checked(out, state, "diffusers AutoencoderKL")
    return _like(out, model)


def _identity_quant_convs(state: dict[str, torch.Tensor], dconfig: Mapping[str, Any], z: int,
                          ref: torch.Tensor) -> None:
    # Without diffusers' 1x1 convs the latent passes straight through: an identity conv.
    for key, width, used in (("quant_conv", 2 * z, "use_quant_conv"), ("post_quant_conv", z, "use_post_quant_conv")):
        if not _get(dconfig, used, True):
            state[f"{key}.weight"] = torch.eye(width, dtype=ref.dtype, device=ref.device)[:, :, None, None]
            state[f"{key}.bias"] = torch.zeros(width, dtype=ref.dtype, device=ref.device)


def autoencoder_kl_from_diffusers(model: diffusers.AutoencoderKL) -> AutoencoderKL:
    """Our AutoencoderKL with a diffusers AutoencoderKL's weights (same device and dtype, eval mode).

    The latent scale is not part of the network: take it with `scale_factor_from_diffusers(model)`
    and save it as save_pretrained(..., extra={"scale_factor": ...}).
    """
    dconfig = model.config
    config = autoencoder_config_from_diffusers(dconfig)
    state = autoencoder_kl_state_dict_from_diffusers(model.state_dict())
    _identity_quant_convs(state, dconfig, config.z_channels, next(model.parameters()))
    out = AutoencoderKL(config)
    load_state_checked(out, state, "AutoencoderKL")
    return _like(out, model)


# --------------------------------------------------------------------------- VQModel
#
# diffusers' VQModel is LDM's VQModel: the same encoder (double_z=False, so it emits
# z_channels), quant_conv z -> vq_embed_dim, a Euclidean nearest-code VectorQuantizer,
# post_quant_conv vq_embed_dim -> z, the same decoder. Its encode() returns the
# pre-quantisation latent and decode() quantises first, as our AutoencoderVQ.
#
# Weights: encoder/decoder/quant convs as above, plus the codebook:
#     quantize.codebook (K, D)  <->  quantize.embedding.weight (K, D)
# Our quantiser's training state (steps_unused; cluster_size and embed_sum with ema)
# has no diffusers counterpart: dropped on export, fresh (a new run's) on import.
# Training settings (beta, ema, dead-code restarts) are not part of diffusers' model
# and take our defaults on import.

# diffusers VQModel config keys we read; lookup_from_codebook only changes what
# decode(force_not_quantize=True) expects (indices instead of latents) and is refused.
_KNOWN_DIFFUSERS_VQ_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "sample_size", "num_vq_embeddings",
    "norm_num_groups", "vq_embed_dim", "scaling_factor", "norm_type", "mid_block_add_attention",
    "lookup_from_codebook", "force_upcast",
}
_CODEBOOK_OURS, _CODEBOOK_THEIRS = "quantize.codebook", "quantize.embedding.weight"
_QUANTIZER_TRAINING_STATE = ("quantize.steps_unused", "quantize.cluster_size", "quantize.embed_sum")


def diffusers_vq_model_kwargs(config: AutoencoderVQConfig, *, scale_factor: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for `diffusers.VQModel(**kwargs)` building the same net as `config`."""
    scale_factor = _check_scale("scale_factor", scale_factor)
    ae, q = config.autoencoder, config.quantizer
    if ae.double_z:
        raise ValueError("double_z: diffusers' VQModel encoder emits z_channels (LDM's VQ layout, double_z=False)")
    if q.l2_normalize:
        raise ValueError("l2_normalize: diffusers' VQModel looks codes up by Euclidean distance, not cosine")
    return {
        **_network_kwargs(ae, "VQModel"),
        "num_vq_embeddings": q.codebook_size,
        "vq_embed_dim": q.code_dim,
        "scaling_factor": scale_factor,
        "norm_type": "group",
        "lookup_from_codebook": False,
    }


def autoencoder_vq_config_from_diffusers(dconfig: Mapping[str, Any]) -> AutoencoderVQConfig:
    """Our AutoencoderVQConfig for a diffusers VQModel config (`model.config` or a plain dict)."""
    fields = _network_config_from_diffusers(dconfig, _KNOWN_DIFFUSERS_VQ_KEYS)
    if _get(dconfig, "norm_type", "group") != "group":
        # "spatial" (MoVQ) conditions the decoder's norms on the quantised latent.
        raise ValueError(f"norm_type: only 'group' maps to our decoder, got {dconfig['norm_type']!r}")
    if _get(dconfig, "lookup_from_codebook", False):
        raise ValueError("lookup_from_codebook: our decode(quantize=False) takes latents, not code indices")
    code_dim = _get(dconfig, "vq_embed_dim") or fields["z_channels"]  # diffusers: None means latent_channels
    return AutoencoderVQConfig(
        autoencoder=AutoencoderConfig(**fields, double_z=False),
        quantizer=QuantizerConfig(codebook_size=_required(dconfig, "num_vq_embeddings"), code_dim=code_dim),
    )


def with_fresh_quantizer_state(state: Mapping[str, torch.Tensor],
                               own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the quantiser's training clock / EMA statistics taken from `own` (a new model's):
    imported or initial weights start them fresh, and which exist depends on the new config's `ema`."""
    out = {k: v for k, v in state.items() if k not in _QUANTIZER_TRAINING_STATE}
    out.update({k: own[k] for k in _QUANTIZER_TRAINING_STATE if k in own})
    return out


def autoencoder_vq_state_dict_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our AutoencoderVQ state dict -> diffusers VQModel's (a pure function; training state dropped)."""
    state = dict(state)
    if _CODEBOOK_OURS not in state:
        raise ValueError(f"state_dict: no {_CODEBOOK_OURS!r}; not an AutoencoderVQ state dict")
    codebook = state.pop(_CODEBOOK_OURS)
    for key in _QUANTIZER_TRAINING_STATE:
        state.pop(key, None)
    return {**autoencoder_kl_state_dict_to_diffusers(state), _CODEBOOK_THEIRS: codebook}


def autoencoder_vq_state_dict_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VQModel state dict -> ours (a pure function; no quantiser training state)."""
    state = dict(state)
    if _CODEBOOK_THEIRS not in state:
        raise ValueError(f"state_dict: no {_CODEBOOK_THEIRS!r}; not a diffusers VQModel state dict")
    codebook = state.pop(_CODEBOOK_THEIRS)
    return {**autoencoder_kl_state_dict_from_diffusers(state), _CODEBOOK_OURS: codebook}


def autoencoder_vq_to_diffusers(model: AutoencoderVQ, *, scale_factor: float = 1.0) -> diffusers.VQModel:
    """A diffusers VQModel with `model`'s weights (same device and dtype, eval mode)."""
    import diffusers

    kwargs = diffusers_vq_model_kwargs(model.config, scale_factor=scale_factor)
    out = diffusers.VQModel(**kwargs)
    load_state_checked(out, autoencoder_vq_state_dict_to_diffusers(model.state_dict()), "diffusers VQModel")
    return _like(out, model)


def autoencoder_vq_from_diffusers(model: diffusers.VQModel) -> AutoencoderVQ:
    """Our AutoencoderVQ with a diffusers VQModel's weights (same device and dtype, eval mode).

    The latent scale: `scale_factor_from_diffusers(model)`.
    """
    out = AutoencoderVQ(autoencoder_vq_config_from_diffusers(model.config))
    state = autoencoder_vq_state_dict_from_diffusers(model.state_dict())
    load_state_checked(out, with_fresh_quantizer_state(state, out.state_dict()), "AutoencoderVQ")
    return _like(out, model)


# --------------------------------------------------------------------------- saved directories

# What diffusers' save_pretrained writes (safetensors since 0.15; the .bin before).
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}


def read_diffusers_autoencoder(directory) -> tuple[str, AutoencoderConfig | AutoencoderVQConfig,
                                                   dict[str, torch.Tensor], float | None]:
    """A directory written by diffusers' `AutoencoderKL/VQModel.save_pretrained`, read without
    diffusers: (family "kl" or "vq", our config, our state dict, scaling_factor or None).
    The VQ state has no quantiser training state (a new model's is used, as on import)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    dconfig = json.loads((directory / "config.json").read_text())
    cls = dconfig.get("_class_name")
    if cls not in _CLASSES:
        raise ValueError(f"{directory}: _class_name {cls!r} in config.json; expected one of {sorted(_CLASSES)}")
    weights = next((directory / n for n in DIFFUSERS_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{directory}: none of {', '.join(DIFFUSERS_WEIGHTS)}")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        theirs = load_file(str(weights))
    else:
        theirs = torch.load(weights, map_location="cpu", weights_only=True)
    scale = dconfig.get("scaling_factor")
    scale = None if scale is None else _check_scale("scaling_factor", scale)
    if _CLASSES[cls] == "kl":
        config = autoencoder_config_from_diffusers(dconfig)
        state = autoencoder_kl_state_dict_from_diffusers(theirs)
        _identity_quant_convs(state, dconfig, config.z_channels, next(iter(theirs.values())))
        return "kl", config, state, scale
    config = autoencoder_vq_config_from_diffusers(dconfig)
    return "vq", config, autoencoder_vq_state_dict_from_diffusers(theirs), scale
