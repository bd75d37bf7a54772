"""Converters between our models and other libraries' (diffusers).

The other library is imported inside the functions that build or read its
objects, never at import time: it is a test and conversion dependency, not a
runtime one. The state-dict mappers are pure functions of tensors and configs.
"""

from models.interop.diffusers_unet import (
    diffusers_unet_kwargs,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
    unet_to_diffusers,
)

__all__ = [
    "diffusers_unet_kwargs",
    "unet_config_from_diffusers",
    "unet_from_diffusers",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
    "unet_to_diffusers",
]
