"""Optimizer parameter groups: weight-decay exemptions and layer-wise lr decay.

Weight decay always skips 1-D tensors (norms, biases). Pretraining stops there, as MAE's
``main_pretrain.py`` (timm ``add_weight_decay`` without a skip list) and iBOT's ``get_params_groups`` do:
their [CLS], mask and position tokens are decayed (MAE's position embeddings are frozen, so not
optimised at all). Fine-tuning also skips the tokens timm's ``VisionTransformer.no_weight_decay()``
names (``FINETUNE_NO_DECAY``), as MAE's ``main_finetune.py`` passes them to ``param_groups_lrd``.

Layer-wise lr decay follows BEiT / MAE ``util/lr_decay.py``: a ViT parameter in layer ``i`` gets
``lr_scale = decay ** (depth + 1 - i)`` with patch embed / cls / pos embed in layer 0, block ``b`` in
layer ``b + 1`` and the rest (final norm, fc_norm, head) in layer ``depth + 1`` (scale 1). The engine
multiplies each group's lr by ``lr_scale``.
"""

from __future__ import annotations

import torch
from torch import nn

FINETUNE_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")


def is_no_decay(name: str, param: torch.Tensor, names: tuple[str, ...] = ()) -> bool:
    """1-D tensors and biases, and parameters whose last name component is in ``names``."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in names


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index of a ViT parameter for layer-wise decay (0 = embeddings, depth + 1 = head)."""
    name = name.removeprefix("module.").removeprefix("encoder.")
    if name.split(".")[0] in ("cls_token", "pos_embed", "mask_token", "reg_token", "patch_embed", "masked_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    depth: int | None = None,
    no_weight_decay: tuple[str, ...] = (),
) -> list[dict]:
    """Split trainable parameters into groups with ``weight_decay`` and ``lr_scale``.

    ``no_weight_decay``: names exempt besides 1-D tensors and biases (``FINETUNE_NO_DECAY`` for
    fine-tuning; none for pretraining). With ``layer_decay`` (and the ViT ``depth``) each (layer,
    decay/no-decay) pair is its own group.
    """
    if layer_decay is not None and depth is None:
        raise ValueError("layer_decay needs the ViT depth")
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not is_no_decay(name, p, no_weight_decay)
        layer = vit_layer_id(name, depth) if layer_decay is not None else 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw(
    groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), device: torch.device | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (names stripped), fused on CUDA."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(clean, lr=lr, betas=betas, fused=fused or None)
