"""The fine-tuning recipe of MAE (He et al. 2021, Sec. A.1, Table 9; ``main_finetune.py``), built from timm parts.

- augmentation: RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25
  (timm ``create_transform``, as MAE's ``build_transform``); evaluation: resize + centre crop;
- Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 folded into the soft targets (timm ``Mixup``) and
  ``SoftTargetCrossEntropy``; without mixing, label-smoothed cross-entropy;
- AdamW with weight decay 0.05 off 1-D parameters and the cls/position tokens, layer-wise lr decay
  (``components.training.optim.param_groups``), lr = blr * batch / 256, warmup then cosine.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from components.training.distributed import sample_seed
from components.training.optim import FINETUNE_NO_DECAY, adamw, param_groups

# Pillow >= 10 refuses to posterize to 0 bits, which timm's increasing-severity posterize asks for at
# magnitude 10 (the top of the scale, hit whenever the magnitude noise is clipped there). Unless the
# config sets its own bound, magnitudes are clipped to [0, 9] (timm's ``mmax`` takes integers only);
# with MAE's m9 that trims only the noise above 9.
RAND_AUGMENT_MMAX = 9


def rand_augment_config(config: str) -> str:
    """timm's RandAugment string with the magnitude bound ``mmax`` set (see ``RAND_AUGMENT_MMAX``)."""
    parts = config.split("-")
    if any(p.startswith("mmax") for p in parts[1:]):
        return config
    return f"{config}-mmax{RAND_AUGMENT_MMAX}"


def finetune_transforms(
    img_size: int,
    rand_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    eval_crop_pct: float = 1.0,
    hflip: float = 0.5,
):
    """(train, eval) PIL -> tensor transforms. Training flips horizontally with probability ``hflip``
    (timm's and MAE's 0.5; 0 leaves the flip out). Evaluation resizes the short side to ``img_size /
    eval_crop_pct`` and takes the centre ``img_size`` crop: MAE's ``build_transform`` uses 224/256 at
    224 px; 1 keeps the whole image."""
    train = create_transform(
        img_size,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=hflip,
        auto_augment=rand_augment_config(rand_augment) if rand_augment else None,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        color_jitter=None,
        mean=mean,
        std=std,
    )
    evaluation = create_transform(
        img_size, is_training=False, crop_pct=eval_crop_pct, interpolation=interpolation, mean=mean, std=std
    )
    return train, evaluation


def build_mixup(num_classes: int, mixup: float, cutmix: float, label_smoothing: float) -> Mixup | None:
    """timm ``Mixup`` (batch mode, switch prob 0.5 between Mixup and CutMix), or None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def finetune_criterion(mixup_fn: Mixup | None, label_smoothing: float) -> nn.Module:
    """Soft-target CE when mixing (smoothing is already in the targets), else smoothed or plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


class FinetuneStep:
    """``step_fn`` for the shared engine: mix the batch, forward, loss.

    timm's Mixup draws from numpy's global RNG, which the engine does not checkpoint; the draws are
    therefore seeded from (seed, step, micro-batch), so a resumed run mixes exactly as an uninterrupted one.
    Under DDP each ``rank`` draws its own lambda and box; rank 0 draws what a single process draws.
    """

    def __init__(self, criterion: nn.Module, mixup_fn: Mixup | None = None, seed: int = 0, rank: int = 0):
        self.criterion, self.mixup_fn, self.seed, self.rank = criterion, mixup_fn, seed, rank
        self._step, self._micro = -1, 0

    def __call__(self, model: nn.Module, batch, step: int):
        images, targets = batch  # [B, 3, H, W], [B]
        if self.mixup_fn is not None:
            self._micro = self._micro + 1 if step == self._step else 0
            self._step = step
            state = np.random.get_state()
            seed = sample_seed(self.seed, step, self._micro)
            np.random.seed((sample_seed(seed, 0, self.rank) if self.rank else seed) % 2**32)
            try:
                images, targets = self.mixup_fn(images, targets)  # targets -> soft [B, C]
            finally:
                np.random.set_state(state)
        logits = model(images)  # [B, C]
        loss = self.criterion(logits, targets)
        return loss, {}


def finetune_optimizer(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None,
    depth: int | None,
    device: torch.device | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over weight-decay groups; with ``layer_decay`` each ViT layer's group carries
    ``lr_scale = layer_decay ** (depth + 1 - layer)`` (the engine multiplies the lr by it).
    The base lr is set by the engine's schedule each step."""
    groups = param_groups(model, weight_decay, layer_decay=layer_decay, depth=depth, no_weight_decay=FINETUNE_NO_DECAY)
    return adamw(groups, lr=0.0, betas=betas, device=device)
