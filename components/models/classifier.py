"""Classifiers that fine-tuning trains and CKA/report read back: builders and one on-disk format.

A fine-tuned classifier is ``model.safetensors`` + ``model.json``:
``{"arch": "vit", <ViTSpec fields>, "num_classes", "global_pool", "classes"}`` for a ViT, or
``{"arch": "<resnet name>", "num_classes", "classes", "img_size", "width"}`` for the CNN baseline.
The ViT head follows MAE's fine-tuning (He et al. 2021, Sec. A.1 and ``main_finetune.py``):
global average pooling + ``fc_norm`` (or the [CLS] token), head weights trunc_normal(std 2e-5),
the encoder's final ``norm`` dropped when pooling with ``fc_norm``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from components.io import load_safetensors, read_json, save_safetensors, write_json
from components.models.cnn import CNN_PRESETS, create_cnn
from components.models.vit import ViTSpec, create_vit, load_encoder, state_dict_mismatch

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_SPEC = "model.json"


class ClassifierLoadError(ValueError):
    """A saved classifier is unreadable or does not fit the architecture its JSON describes."""


def init_head(model: nn.Module, std: float = 2e-5) -> None:
    """Fresh classification head: weights trunc_normal(std), bias 0 (MAE ``main_finetune.py``)."""
    head = model.head if isinstance(model, VisionTransformer) else model.fc
    trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)


def build_vit_classifier(
    num_classes: int,
    encoder_dir: str | Path | None = None,
    spec: ViTSpec | None = None,
    global_pool: str = "avg",
    drop_path_rate: float = 0.1,
    head_init_std: float = 2e-5,
) -> tuple[VisionTransformer, ViTSpec]:
    """A ViT classifier, initialised from a pretrained encoder directory or from scratch (``spec``).

    The position embedding stays trainable, as in MAE's fine-tuning; the head always starts fresh.
    """
    if (encoder_dir is None) == (spec is None):
        raise ValueError("build_vit_classifier: give exactly one of encoder_dir (pretrained) or spec (scratch)")
    if global_pool not in ("avg", "token"):
        raise ValueError(f"build_vit_classifier: global_pool must be 'avg' or 'token', got {global_pool!r}")
    if encoder_dir is not None:
        model, spec = load_encoder(
            encoder_dir, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate
        )
    else:
        model = create_vit(
            spec, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate, pos_embed="sincos"
        )
    init_head(model, head_init_std)
    return model, spec


def build_cnn_classifier(name: str, num_classes: int, img_size: int, width: int = 64) -> nn.Module:
    """The CNN baseline, trained from scratch (see :mod:`components.models.cnn`)."""
    return create_cnn(name, num_classes=num_classes, img_size=img_size, width=width)


def vit_meta(spec: ViTSpec, num_classes: int, global_pool: str, classes: list[str]) -> dict:
    return {
        "arch": "vit",
        **spec.to_dict(),
        "num_classes": num_classes,
        "global_pool": global_pool,
        "classes": list(classes),
    }


def cnn_meta(name: str, num_classes: int, img_size: int, width: int, classes: list[str]) -> dict:
    return {"arch": name, "num_classes": num_classes, "img_size": img_size, "width": width, "classes": list(classes)}


def save_classifier(model: nn.Module, out_dir: str | Path, meta: dict) -> Path:
    """Write ``model.safetensors`` (the full state dict) and ``model.json`` (``meta``) atomically."""
    out_dir = Path(out_dir)
    unwrapped = getattr(model, "module", model)  # DDP
    save_safetensors(out_dir / CLASSIFIER_WEIGHTS, unwrapped.state_dict())
    write_json(out_dir / CLASSIFIER_SPEC, meta)
    return out_dir


def _build_from_meta(meta: dict, source: Path) -> nn.Module:
    arch = meta.get("arch")
    try:
        if arch == "vit":
            fields = {f.name for f in dataclasses.fields(ViTSpec)}
            spec = ViTSpec(**{k: v for k, v in meta.items() if k in fields})
            return create_vit(
                spec,
                num_classes=int(meta["num_classes"]),
                global_pool=meta.get("global_pool", "avg"),
                pos_embed="sincos",
            )
        if arch in CNN_PRESETS:
            return create_cnn(
                arch,
                num_classes=int(meta["num_classes"]),
                img_size=int(meta["img_size"]),
                width=int(meta.get("width", 64)),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise ClassifierLoadError(f"{source}: bad architecture description ({type(e).__name__}: {e})") from None
    raise ClassifierLoadError(f"{source}: unknown arch {arch!r}; known: vit, {', '.join(CNN_PRESETS)}")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that names the offending tensors."""
    problems = state_dict_mismatch(state, model.state_dict())
    if problems:
        raise ClassifierLoadError(f"{source}: weights do not match the architecture ({problems})")
    model.load_state_dict(state, strict=True)


def read_classifier_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CLASSIFIER_SPEC
    meta = read_json(path)
    if not isinstance(meta, dict) or "arch" not in meta:
        raise ClassifierLoadError(f"{path}: expected a JSON object with an 'arch' key")
    return meta


def load_classifier(model_dir: str | Path) -> nn.Module:
    """Rebuild the classifier saved by :func:`save_classifier` and load its weights (eval mode)."""
    model_dir = Path(model_dir)
    meta = read_classifier_meta(model_dir)
    model = _build_from_meta(meta, model_dir / CLASSIFIER_SPEC)
    weights = model_dir / CLASSIFIER_WEIGHTS
    load_state_strict(model, load_safetensors(weights), str(weights))
    return model.eval()
