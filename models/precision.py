"""Which compute precision a device runs fast: bf16 where the hardware has it, fp32 elsewhere.

bf16 autocast is the fast path on GPUs with bf16 (Ampere and newer) and on CPUs with AVX-512-bf16 or
AMX tiles, but on a CPU without them every bf16 op is emulated: measured on this project's AVX2-only
2-core machine, a quickstart autoencoder step under bf16 autocast took 16x as long as in fp32 and a
U-Net step 12x (BENCHMARKS.md). "auto" therefore resolves per device, where the step runs.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """True when `device` computes bf16 in hardware (not by emulation through fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for `device`: "auto" is bf16 where native_bf16, else fp32; an explicit
    choice is kept (bf16 on emulating hardware still works, slowly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
