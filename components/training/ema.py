"""Exponential moving average of a student into a teacher (iBOT's online tokenizer, Soft Teacher's
mean teacher): ``teacher = m * teacher + (1 - m) * student`` over parameters only."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} parameters, student {len(s)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def copy_as_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """Start the teacher as an exact copy of the student, frozen (no gradients)."""
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
