"""iBOT's training step for the shared engine (Zhou et al. 2021, Sec. 3.2-3.3; ``main_ibot.py: train_one_epoch``).

The model parts (:class:`~components.models.ibot.IBOTViT`, :class:`~components.models.ibot.IBOTLoss`, the
schedules of the teacher's momentum and temperature) are in :mod:`components.models.ibot`; this module puts them
in the order of one iteration, as the engine calls them (:class:`components.training.engine.Trainer`):

1. ``step_fn``: the teacher on the two unmasked global crops; the student on the masked global crops and the
   local crops; the iBOT loss (Eq. 1-2), which moves the centres; the teacher's collapse diagnostics;
2. ``grad_hook`` (after backward, before clipping): the head's last layer frozen for the first epochs;
3. ``after_step`` (after the optimizer step): the teacher as the EMA of the student.
"""

from __future__ import annotations

import torch
from torch import nn

from components.models.ibot import (
    IBOTLoss,
    IBOTViT,
    cancel_gradients_last_layer,
    output_entropy,
    teacher_momentum,
    teacher_probs,
    teacher_temperature,
)
from components.training.distributed import sample_seed
from components.training.ema import ema_update


class IBOTTraining:
    """The iBOT step for the shared engine (``main_ibot.py: train_one_epoch``), one object holding
    the teacher, the loss (with its centres) and the per-step schedules.

    - ``step_fn(student, batch, step)``: teacher on the two unmasked global crops, student on the
      masked global crops and the local crops, iBOT loss; logs the teacher's collapse diagnostics;
    - ``grad_hook(step)``: cancels the last layer's gradients during the first
      ``freeze_last_layer_epochs`` epochs;
    - ``after_step(step)``: EMA of the student into the teacher, momentum cosine ``momentum`` -> 1;
    - ``extra_state``: teacher and loss (centres), for the engine's checkpoints.

    ``student`` is the unwrapped module (the engine hands ``step_fn`` the DDP-wrapped one). With a
    ``seed``, each step reseeds torch's RNG from (seed, step, rank) before the student's forward, so
    the student's drop path draws the same masks in a run resumed mid-epoch as in an uninterrupted one
    (creating a DataLoader iterator draws from the global RNG, and a resumed run creates one at a
    different step).
    """

    def __init__(
        self,
        student: IBOTViT,
        teacher: IBOTViT,
        loss: IBOTLoss,
        steps_per_epoch: int,
        total_steps: int,
        momentum: float = 0.996,
        teacher_temp: tuple[float, float] = (0.04, 0.07),
        teacher_patch_temp: tuple[float, float] = (0.04, 0.07),
        warmup_teacher_temp_epochs: int = 30,
        freeze_last_layer_epochs: int = 1,
        seed: int | None = None,
        rank: int = 0,
    ) -> None:
        self.student, self.teacher, self.loss = student, teacher, loss
        self.seed, self.rank = seed, rank
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.momentum = momentum
        self.teacher_temp, self.teacher_patch_temp = teacher_temp, teacher_patch_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        for p in teacher.parameters():
            p.requires_grad_(False)

    @property
    def extra_state(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "ibot_loss": self.loss}

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def temperatures(self, step: int) -> tuple[float, float]:
        epoch = self.epoch_of(step)
        return (
            teacher_temperature(epoch, self.warmup_teacher_temp_epochs, *self.teacher_temp),
            teacher_temperature(epoch, self.warmup_teacher_temp_epochs, *self.teacher_patch_temp),
        )

    def step_fn(self, student: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        glob, loc, masks = batch["global"], batch["local"], batch["masks"]
        with torch.no_grad():
            t = self.teacher(glob)  # the teacher sees only the unmasked global crops
        if self.seed is not None:
            torch.manual_seed(sample_seed(self.seed, step, self.rank))  # drop path, resumable
        s = student(glob, loc, masks)
        temp, temp2 = self.temperatures(step)
        diag = output_entropy(teacher_probs(t["cls"], self.loss.center, temp))  # before the centre moves
        loss, logs = self.loss(s["cls"], s["patch"], t["cls"], t["patch"], torch.cat(list(masks)), temp, temp2)
        logs.update(teacher_entropy=diag["entropy"], teacher_kl=diag["kl"], teacher_temp=temp)
        return loss, logs

    def grad_hook(self, step: int) -> None:
        cancel_gradients_last_layer(self.student, self.epoch_of(step), self.freeze_last_layer_epochs)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, teacher_momentum(step, self.total_steps, self.momentum, 1.0))
