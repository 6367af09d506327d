"""Per-iteration schedules against the reference code they copy: DINO/iBOT ``utils.cosine_scheduler``
(iBOT's lr, weight decay and teacher momentum) and MAE ``util/lr_sched.adjust_learning_rate`` (MAE,
fine-tuning, linear probe), and the step floor that stretches epochs and warmup on a small dataset."""

import math

import numpy as np
import pytest

from components.training.schedules import cosine, cosine_scheduler, stretch_epochs, warmup_cosine


def reference_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """utils.cosine_scheduler of DINO/iBOT, written out."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def test_cosine_scheduler_is_the_dino_ibot_array_read_at_each_iteration():
    epochs, niter = 6, 7
    T = epochs * niter
    lr = reference_cosine_scheduler(5e-4, 1e-6, epochs, niter, warmup_epochs=2)  # iBOT's lr
    np.testing.assert_allclose(
        [cosine_scheduler(i, T, 5e-4, 1e-6, 2 * niter) for i in range(T)], lr, rtol=1e-12, atol=0
    )
    assert cosine_scheduler(2 * niter - 1, T, 5e-4, 1e-6, 2 * niter) == pytest.approx(5e-4)  # linspace ends on base
    wd = reference_cosine_scheduler(0.04, 0.4, epochs, niter)  # iBOT's weight decay
    np.testing.assert_allclose([cosine(i, T, 0.04, 0.4) for i in range(T)], wd, rtol=1e-12, atol=0)
    assert cosine(T - 1, T, 0.04, 0.4) == pytest.approx(0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi * (T - 1) / T)))
    assert cosine(T, T, 0.04, 0.4) == pytest.approx(0.4)  # past the end: the final value


def test_warmup_cosine_is_mae_adjust_learning_rate():
    # lr_sched.adjust_learning_rate(epoch = it / niter_per_ep): lr * epoch / warmup, then
    # min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))
    epochs, niter, warmup, lr, min_lr = 5, 8, 2, 1.5e-4, 1e-6
    for it in range(epochs * niter):
        epoch = it / niter
        if epoch < warmup:
            expected = lr * epoch / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
        assert warmup_cosine(it, epochs * niter, warmup * niter, lr, min_lr) == pytest.approx(
            expected, rel=1e-12, abs=0
        )


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
