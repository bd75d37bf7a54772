"""Learning-rate schedules as pure functions of the step (no scheduler state to checkpoint: a resumed
run recomputes the same rate from its step)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, max_steps: int,
                  final_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps` (step 0 -> 0), then cosine decay to base_lr * final_ratio at
    max_steps (open_clip's and most diffusion recipes' schedule). `step` counts optimizer steps taken."""
    if warmup_steps and step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    floor = base_lr * final_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_constant(step: int, base_lr: float, warmup_steps: int, max_steps: int,
                    final_ratio: float = 0.0) -> float:
    """Linear warm-up, then base_lr (LDM's autoencoder recipe has no decay)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr


LR_SCHEDULES = {"constant": warmup_constant, "cosine": warmup_cosine}
