"""Classification metrics: top-k accuracy, the confusion matrix and its figure.

Top-1/top-5 are the numbers MAE and iBOT report on ImageNet (He et al. 2021, Table 3; Zhou et al.
2021, Table 2). With fewer than k classes, top-k is computed with k clipped to the class count.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest logits, for each k.

    logits [N, C], targets [N] (class indices).
    """
    ks = tuple(ks)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top.eq(targets.view(-1, 1))  # [N, kmax]
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k."""
    n = max(int(targets.numel()), 1)
    return {k: 100.0 * c / n for k, c in topk_correct(logits, targets, ks).items()}


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts; row = true class, column = predicted class."""
    idx = targets.long() * num_classes + preds.long()  # [N]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode) over ``loader`` of (images, labels) -> (logits [N, C], labels [N]) on CPU."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        out = model(images.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(
    model: nn.Module, loader: Iterable, num_classes: int, device: torch.device | str = "cpu"
) -> dict:
    """Top-1, top-5 (percent), mean cross-entropy and the confusion matrix of ``model`` on ``loader``."""
    logits, labels = predict(model, loader, device)
    acc = topk_accuracy(logits, labels, (1, 5))
    return {
        "top1": acc[1],
        "top5": acc[5],
        "loss": float(nn.functional.cross_entropy(logits, labels)),
        "confusion": confusion_matrix(logits.argmax(dim=1), labels, num_classes),
        "n": int(labels.numel()),
    }


def confusion_figure(cm: torch.Tensor | np.ndarray, classes: list[str], title: str = "") -> plt.Figure:
    """Row-normalised confusion matrix as a heatmap, with the raw counts written in each cell."""
    cm = np.asarray(cm, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # [C, C]
    n = len(classes)
    size = max(3.5, 0.45 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
