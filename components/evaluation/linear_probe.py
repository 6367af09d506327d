"""Linear probing of a frozen encoder (He et al. 2021, Sec. A.2 and ``main_linprobe.py``).

The encoder is frozen; its pooled feature goes through ``BatchNorm1d(affine=False, eps=1e-6)``
(a parameter-free normaliser that MAE adds because MAE features have very different scales) and a
``Linear`` head initialised trunc_normal(std 0.01). Only the head is trained, lr = blr * batch / 256,
linear warmup then cosine.

Two departures from MAE's recipe, both for data sets of a few hundred images: the encoder is frozen,
so its features are computed once and the head is trained on them (no augmentation), which turns the
probe into seconds of CPU work; and the optimizer is momentum SGD instead of LARS. LARS scales
each step to ``trust_coeff * |w|`` (1e-3), which MAE compensates with 7,000 steps at lr 6.4 (batch
16,384); a few hundred steps cannot grow a 0.01-initialised head that way (measured: chance accuracy
on separable toy features, where SGD reaches 100 %). BatchNorm already puts the features on one scale.
Batches are equal splits of each epoch rather than ``drop_last`` ones (``fit_probe_head``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from components.training.schedules import warmup_cosine


def pool_features(encoder: VisionTransformer, x: torch.Tensor, pool: str = "token") -> torch.Tensor:
    """The encoder's frozen representation of images x [N, C, H, W] -> [N, D].

    ``token``: the [CLS] output after the final norm (MAE's linear-probe default); ``avg``: the mean
    of the normalised patch tokens.
    """
    tokens = encoder.forward_features(x)  # [N, 1 + L, D]
    if pool == "token":
        return tokens[:, 0]  # [N, D]
    if pool == "avg":
        return tokens[:, encoder.num_prefix_tokens :].mean(dim=1)  # [N, D]
    raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d without affine parameters, then Linear (weights trunc_normal std 0.01, bias 0)."""
    linear = nn.Linear(dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


class LinearProbe(nn.Module):
    """Frozen encoder -> pooled feature -> ``probe_head``. Only ``head`` has trainable parameters,
    and the encoder stays in eval mode whatever ``train()`` is called with."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str = "token") -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.pool = pool
        self.head = probe_head(encoder.embed_dim, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.encoder, x, self.pool)  # [N, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N, num_classes]


@torch.no_grad()
def extract_pooled_features(
    encoder: VisionTransformer, loader: Iterable, pool: str = "token", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of ``loader`` of (images, labels) through the frozen encoder."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, targets in loader:
        feats.append(pool_features(encoder, images.to(device), pool).float().cpu())
        labels.append(targets.cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_probe_head(
    head: nn.Sequential,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    weight_decay: float = 0.0,
    warmup_epochs: int = 10,
    seed: int = 0,
) -> list[float]:
    """Train ``head`` on cached features [N, D] with cross-entropy; returns the mean loss per epoch.

    Momentum SGD, lr = blr * batch / 256 set per iteration (warmup then cosine to 0). Each epoch
    splits a fresh permutation into equal batches of at most ``batch_size`` (sizes differ by at most
    one, each >= 2 for BatchNorm), so every feature is seen every epoch: with a few hundred labeled
    images, MAE's ``drop_last`` would leave out up to half of them (480 at batch 256: 224).
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"the linear probe needs at least 2 labeled features, got {n}")
    steps_per_epoch = min(math.ceil(n / batch_size), n // 2)  # >= 1 for n >= 2
    batch_size = math.ceil(n / steps_per_epoch)  # the largest batch
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    lr = blr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    history = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        losses = []
        for idx in torch.tensor_split(order, steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total, warmup, lr)
            loss = nn.functional.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        history.append(sum(losses) / len(losses))
    head.eval()
    return history
