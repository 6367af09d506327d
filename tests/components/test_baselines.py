"""Raw-pixel baselines: the logistic regression reaches the penalised optimum, and both baselines
separate what is separable in pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.evaluation.baselines import fit_logistic_regression, flatten_pixels, logistic_accuracy, pixel_baselines


def blobs(n: int, d: int, classes: int, seed: int, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_logistic_regression_converges_to_the_optimum_of_its_objective():
    x, y = blobs(60, 5, 3, seed=0, spread=2.0)
    w, b, info = fit_logistic_regression(x, y, 3)
    assert info["converged"] and info["l2"] == 1 / 60
    # first-order optimality, checked independently: the gradient of the objective at (w, b) is ~0
    w_, b_ = w.double().requires_grad_(), b.double().requires_grad_()
    loss = F.cross_entropy(x.double() @ w_.T + b_, y) + 0.5 * (1 / 60) * (w_ * w_).sum()
    loss.backward()
    assert w_.grad.abs().max() <= 1e-4 and b_.grad.abs().max() <= 1e-4
    # and a perturbed solution is worse
    with torch.no_grad():
        worse = F.cross_entropy(x.double() @ (w_ + 0.05).T + b_, y) + 0.5 * (1 / 60) * ((w_ + 0.05) ** 2).sum()
    assert worse > loss


def test_baselines_separate_separable_pixels_and_sit_at_chance_on_noise():
    train_x, train_y = blobs(80, 3 * 4 * 4, 4, seed=1)
    val_x, val_y = blobs(40, 3 * 4 * 4, 4, seed=2)
    res = pixel_baselines(train_x, train_y, val_x, val_y, 4, k=5, temperature=0.07)
    assert res["logistic_top1"] == 100.0 and res["knn_top1"] == 100.0 and res["logistic"]["converged"]
    g = torch.Generator().manual_seed(3)
    noise_y = torch.randint(0, 4, (400,), generator=g)
    noise = pixel_baselines(
        torch.randn(80, 48, generator=g), noise_y[:80], torch.randn(320, 48, generator=g), noise_y[80:], 4, 5, 0.07
    )
    assert noise["logistic_train_top1"] == 100.0  # 48 dims fit 80 labels ...
    assert (
        10 < noise["logistic_top1"] < 40 and 10 < noise["knn_top1"] < 40
    )  # ... and generalise to nothing (chance 25 %)


def test_flatten_and_accuracy():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert flatten_pixels(images).shape == (2, 12) and torch.equal(flatten_pixels(images)[1], images[1].flatten())
    w, b = torch.eye(2), torch.zeros(2)
    assert logistic_accuracy(
        w, b, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 1, 1])
    ) == pytest.approx(100 * 2 / 3, abs=1e-4)
