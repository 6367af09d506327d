"""Weighted k-NN classification on frozen features (Wu et al. 2018, as DINO ``eval_knn.py`` and
iBOT report it: Caron et al. 2021 Sec. 4.1, Zhou et al. 2021 Sec. 4.1).

Features are L2-normalised; each test image takes its k most cosine-similar training images, and
each neighbour votes for its label with weight exp(sim / T). DINO and iBOT use k = 20, T = 0.07.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

KNN_K = 20
KNN_T = 0.07


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode) over ``loader`` of (images, labels) -> (feats [N, D] float32 on CPU,
    labels [N]). ``forward(model, images) -> [B, D]`` defaults to ``model(images)``, which for the
    shared ViT built with ``num_classes=0, global_pool='token'`` is the final-norm [CLS] token, the
    feature DINO and iBOT evaluate."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            out = forward(model, images) if forward is not None else model(images)
            if out.ndim != 2:
                raise ValueError(f"features must be [B, D], the model returned shape {tuple(out.shape)}")
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    T: float = KNN_T,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [N_test, C]: sum over the k nearest (cosine) training features of exp(sim / T),
    per class. With fewer than k training samples, all of them vote."""
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train features have dim {train_feats.shape[1]}, test features {test_feats.shape[1]}")
    if k < 1 or T <= 0:
        raise ValueError(f"k must be >= 1 and T > 0, got k={k}, T={T}")
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)  # [N_train, D]
    labels = train_labels.long().to(train.device)
    scores = []
    for start in range(0, test_feats.shape[0], chunk_size):
        test = F.normalize(test_feats[start : start + chunk_size].float().to(train.device), dim=1)  # [b, D]
        sim, idx = (test @ train.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(test.shape[0], num_classes, device=train.device)  # [b, C]
        votes.scatter_add_(1, labels[idx], (sim / T).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    T: float = KNN_T,
) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN classifier."""
    preds = knn_classify(train_feats, train_labels, test_feats, num_classes, k, T).argmax(dim=1)
    return 100.0 * float((preds.cpu() == test_labels.long().cpu()).float().mean())
