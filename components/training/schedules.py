"""Per-iteration schedules (MAE ``util/lr_sched.py``, DINO/iBOT ``cosine_scheduler``).

Every schedule is a pure function of the optimizer step, so a resumed run sets exactly the value an
uninterrupted run would have set at the same step.
"""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to ``base`` over ``warmup_steps``, then half-cosine from ``base`` to ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (last step): iBOT's teacher momentum and weight decay."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def multistep(step: int, base: float, milestones: list[int], gamma: float = 0.1, warmup_steps: int = 0, warmup_ratio: float = 0.001) -> float:
    """Step decay by ``gamma`` at each milestone with linear warmup (Soft Teacher / mmdetection schedule)."""
    lr = base * gamma ** sum(step >= m for m in milestones)
    if warmup_steps > 0 and step < warmup_steps:
        lr *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return lr


def stretch_epochs(epochs: int, warmup_epochs: float, steps_per_epoch: int, min_steps: int) -> tuple[int, float]:
    """(epochs, warmup epochs) of a schedule that takes at least ``min_steps`` optimizer steps.

    Schedules in epochs, as the papers give them (MAE Sec. A.1/A.2, iBOT Sec. C), assume ImageNet's
    thousands of steps per epoch; on a dataset 10x smaller the same epochs are 10x fewer updates and
    training stops long before it converges. When ``epochs * steps_per_epoch`` falls short of the floor,
    epochs and warmup are stretched by the same factor, so the warmup keeps its share of the schedule.
    A schedule already at or above the floor is returned unchanged.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if epochs * steps_per_epoch >= min_steps:
        return epochs, warmup_epochs
    stretched = math.ceil(min_steps / steps_per_epoch)
    return stretched, warmup_epochs * stretched / epochs
