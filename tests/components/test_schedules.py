"""Schedules that adapt to the data size (issue 27, item 2): a step floor stretches epochs and warmup."""
from __future__ import annotations

import pytest

from components.training.schedules import stretch_epochs


def test_a_schedule_at_or_above_the_floor_is_unchanged():
    # The shapes defaults: finetune 40 x 15 = 600 >= 500, MAE 20 x 37 = 740 >= 700, iBOT 20 x 18 = 360 >= 300.
    assert stretch_epochs(40, 4, 15, 500) == (40, 4)
    assert stretch_epochs(20, 1, 37, 700) == (20, 1)
    assert stretch_epochs(20, 1, 18, 300) == (20, 1)
    assert stretch_epochs(3, 1, 2, 0) == (3, 1)


def test_a_short_schedule_is_stretched_to_the_floor_keeping_the_warmup_share():
    # 144 labels at batch 32: 4 steps an epoch, 40 epochs = 160 steps -> 125 epochs = 500 steps.
    epochs, warmup = stretch_epochs(40, 4, 4, 500)
    assert epochs == 125 and epochs * 4 >= 500 and (epochs - 1) * 4 < 500
    assert warmup / epochs == pytest.approx(4 / 40)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        stretch_epochs(10, 1, 0, 100)
