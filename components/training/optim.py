"""Optimizer parameter groups: weight-decay exemptions and layer-wise lr decay.

Weight decay skips 1-D tensors (norms, biases) and the position/cls/mask tokens, as in MAE
(``optim_factory.param_groups_weight_decay``) and iBOT. Layer-wise lr decay follows BEiT / MAE
``util/lr_decay.py``: a ViT parameter in layer ``i`` gets ``lr_scale = decay ** (depth + 1 - i)``
with patch embed / cls / pos embed in layer 0, block ``b`` in layer ``b + 1`` and the rest (final norm,
fc_norm, head) in layer ``depth + 1`` (scale 1). The engine multiplies each group's lr by ``lr_scale``.
"""
from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token", "masked_embed")


def is_no_decay(name: str, param: torch.Tensor, extra: tuple[str, ...] = ()) -> bool:
    leaf = name.split(".")[-1]
    return param.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES or leaf in extra


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

    With ``layer_decay`` (and the ViT ``depth``) each (layer, decay/no-decay) pair is its own group.
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


def adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (names stripped), fused on CUDA."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(clean, lr=lr, betas=betas, fused=fused or None)
