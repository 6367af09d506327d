"""Per-iteration schedules (MAE ``util/lr_sched.py``, DINO/iBOT ``cosine_scheduler``).

:func:`warmup_cosine` is MAE's ``adjust_learning_rate`` (MAE, fine-tuning and the linear probe):
warmup ``base * step / warmup_steps``, then the cosine over ``(step - W) / (T - W)``.
:func:`cosine_scheduler` is DINO/iBOT's array (iBOT's lr, weight decay and teacher momentum): warmup by
``np.linspace`` (``base`` reached at step ``W - 1``), then the cosine over ``(step - W) / (T - W)``.

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


def cosine_scheduler(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, start_warmup: float = 0.0
) -> float:
    """DINO/iBOT ``utils.cosine_scheduler`` read at iteration ``step``: ``np.linspace(start_warmup, base,
    warmup_steps)`` over the first ``warmup_steps`` iterations (``base`` reached at the last warmup
    iteration), then ``final + (base - final) * 0.5 * (1 + cos(pi * i / n))`` for the ``i``-th of the
    ``n = total_steps - warmup_steps`` remaining iterations; ``i / n`` never reaches 1, so the last
    iteration stays just above ``final`` as in the reference array. Steps past the end hold ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup
        return start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 over ``step / total_steps`` (``cosine_scheduler`` without
    warmup): iBOT's teacher momentum and weight-decay schedules."""
    return cosine_scheduler(step, total_steps, start, end)


def multistep(
    step: int,
    base: float,
    milestones: list[int],
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.001,
) -> float:
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
