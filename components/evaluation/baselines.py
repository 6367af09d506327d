"""Raw-pixel baselines: what a classifier with no learned representation scores on the same split.

A model that does not beat these has learned nothing a linear map or a nearest neighbour of the
pixels would not find. Two baselines, both on the flattened, normalised pixels [N, C*H*W]:

- multinomial logistic regression, trained to convergence: full-batch L-BFGS (float64) on the mean cross-entropy
  plus an L2 penalty lambda / 2 * |W|^2 (lambda = 1 / N: scikit-learn's default C = 1), from zero
  weights, so the result is the penalised problem's unique optimum, whatever the seed;
- the weighted k-NN the pretrained encoders are evaluated with (``components.evaluation.knn``), on pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.evaluation.knn import knn_accuracy


def flatten_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] normalised images -> [N, C*H*W] float32."""
    return images.reshape(images.shape[0], -1).float()


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float | None = None, max_iter: int = 1000, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(W [K, D], b [K], info) minimising mean CE(x W^T + b, y) + l2 / 2 * |W|^2 by L-BFGS.

    ``l2`` None: 1 / N. Stops when the largest gradient entry is below ``tol`` (scikit-learn's lbfgs
    default, 1e-4). ``info``: iterations, final objective and gradient (max abs entry), and ``converged``."""
    n, d = x.shape
    lam = 1.0 / n if l2 is None else l2
    w = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x64, y64 = x.double(), y.long()
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w.T + b, y64) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(objective)
    loss = objective()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    state = opt.state[opt._params[0]]
    info = {
        "iterations": int(state.get("n_iter", 0)),
        "objective": float(loss.detach()),
        "grad_max": grad,
        "converged": grad <= tol,
        "l2": lam,
    }
    return w.detach().float(), b.detach().float(), info


def logistic_accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (percent) of the linear classifier on x [N, D]."""
    return 100.0 * float(((x @ w.T + b).argmax(1) == y.long()).float().mean())


def pixel_baselines(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> dict:
    """Both baselines on flattened pixels: {"logistic_top1", "logistic_train_top1", "knn_top1", "logistic": info}."""
    w, b, info = fit_logistic_regression(train_x, train_y, num_classes)
    return {
        "logistic_top1": logistic_accuracy(w, b, val_x, val_y),
        "logistic_train_top1": logistic_accuracy(w, b, train_x, train_y),
        "knn_top1": knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=k, T=temperature),
        "logistic": info,
    }
