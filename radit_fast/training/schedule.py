"""Learning-rate schedule: linear warm-up then cosine decay to ``min_lr_ratio * peak``.

The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of the optimizer step with 0-based index ``step``.

    Warm-up: ``peak * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step is not wasted
    at lr 0). Then ``min + (peak - min) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (total -
    warmup)`` clamped to [0, 1], ``min = min_lr_ratio * peak`` (paper: 1e-5 decaying to 1e-7).

    >>> lr_at(0, peak=1.0, warmup_steps=4, total_steps=10)
    0.25
    >>> lr_at(4, peak=1.0, warmup_steps=4, total_steps=10)
    1.0
    >>> round(lr_at(10, peak=1.0, warmup_steps=4, total_steps=10, min_lr_ratio=0.1), 6)
    0.1
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (groups keep their own weight decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed set before each optimizer step (dropout, sampling): a resumed run reproduces it."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)
