"""The Vision Transformer encoder every stage shares: presets, fixed 2D sin-cos position
embeddings, and one on-disk format (safetensors + JSON architecture).

The encoder is timm's ``VisionTransformer`` (fused scaled-dot-product attention, drop path, fc_norm),
so MAE, iBOT, fine-tuning, ViTDet-style detection and CKA all load the same module.
Position embeddings follow MAE (He et al. 2021, ``util/pos_embed.py``): fixed 2D sin-cos with an
all-zero row for the [CLS] token. Note the official code's half named ``emb_h`` encodes the *w*
coordinate (facebookresearch/mae issue #18); here the first half encodes the row (h) coordinate and
the second half the column (w) coordinate, which is the same embedding up to a swap of halves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from components.io import load_safetensors, read_json, save_safetensors, write_json

# Encoder presets by name. The 224 px ones are timm's ViT sizes; the small ones fit the embedded
# shapes images (32/64 px) so the whole pipeline runs on a laptop CPU.
PRESETS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3),
    "vit_micro_patch8_32": dict(img_size=32, patch_size=8, embed_dim=96, depth=6, num_heads=3),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_micro_patch8_64": dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3),
    "vit_tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
}


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of a ViT encoder; written next to its weights as JSON."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViTSpec:
        if name not in PRESETS:
            raise KeyError(f"unknown ViT preset {name!r}; known: {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos embedding of positions ``pos`` (any shape) -> [M, embed_dim] (float64)."""
    assert embed_dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE ``get_2d_sincos_pos_embed``).

    Returns [1, (1 +) grid_size**2, embed_dim]; the first half of the channels encodes the row,
    the second half the column, and the [CLS] row is all zeros.
    """
    assert embed_dim % 4 == 0, "2D sin-cos embedding needs embed_dim divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # [G, G] each
    emb = np.concatenate([sincos_1d(embed_dim // 2, rows), sincos_1d(embed_dim // 2, cols)], axis=1)  # [G*G, D]
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)  # [1 + G*G, D]
    return torch.from_numpy(emb).float().unsqueeze(0)


POS_EMBEDS = ("sincos_fixed", "sincos", "learned")


def create_vit(
    spec: ViTSpec,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_path_rate: float = 0.0,
    pos_embed: str = "sincos_fixed",
) -> VisionTransformer:
    """A timm ViT with the spec's dims.

    ``global_pool='avg'`` gives MAE's fine-tuning head (mean of patch tokens -> fc_norm -> Linear);
    ``'token'`` uses the [CLS] token. ``pos_embed``: ``"sincos_fixed"``, the frozen 2D sin-cos
    embedding of MAE's pretraining; ``"sincos"``, the same left trainable, as MAE's fine-tuning does;
    ``"learned"``, trainable from timm's truncated-normal init (std 0.02), as DINO's and iBOT's ViT.
    """
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
    model = VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
    )
    if pos_embed != "learned":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_2d(spec.embed_dim, spec.grid_size, cls_token=True))
    model.pos_embed.requires_grad_(pos_embed != "sincos_fixed")
    return model


class EncoderLoadError(ValueError):
    """A saved encoder does not fit the requested architecture."""


ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_SPEC = "encoder.json"


def encoder_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The encoder's tensors: everything but the classification head and fc_norm."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def save_encoder(model: VisionTransformer, spec: ViTSpec, out_dir: str | Path, **meta) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` ({"arch": "vit", spec..., meta...}) atomically."""
    out_dir = Path(out_dir)
    save_safetensors(out_dir / ENCODER_WEIGHTS, encoder_state(model))
    write_json(out_dir / ENCODER_SPEC, {"arch": "vit", **spec.to_dict(), **meta})
    return out_dir


def read_spec(encoder_dir: str | Path) -> ViTSpec:
    path = Path(encoder_dir) / ENCODER_SPEC
    meta = read_json(path)
    if meta.get("arch") != "vit":
        raise EncoderLoadError(f"{path}: arch is {meta.get('arch')!r}, expected 'vit'")
    fields = {f.name for f in dataclasses.fields(ViTSpec)}
    try:
        return ViTSpec(**{k: v for k, v in meta.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise EncoderLoadError(f"{path}: {e}") from None


def read_normalisation(encoder_dir: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input (mean, std) an encoder was trained with, as its encoder.json records them, or None."""
    meta = read_json(Path(encoder_dir) / ENCODER_SPEC)
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    return None


def state_dict_mismatch(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], fresh: tuple[str, ...] = ()
) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``target`` ('' when nothing):
    tensors of another shape, unexpected ones, and missing ones (except names starting with ``fresh``,
    the parts a model may start fresh), six of each at most."""
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    )
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state and not (fresh and k.startswith(fresh)))
    parts = [
        f"{what}: {', '.join(names[:6])}"
        for what, names in (("shape mismatch", mismatched), ("unexpected", unexpected), ("missing", missing))
        if names
    ]
    return "; ".join(parts)


def load_encoder_into(model: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy encoder tensors into ``model``; returns the names of the model's tensors left fresh.

    Every tensor in ``state`` must exist in the model with the same shape (MAE's fine-tuning drops
    the final ``norm`` when the model pools with ``fc_norm``, and so do we). Anything else is an
    :class:`EncoderLoadError` that names the tensors.
    """
    target = model.state_dict()
    if isinstance(model.norm, torch.nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    problems = state_dict_mismatch(state, target, fresh=("head.", "fc_norm."))
    if problems:
        raise EncoderLoadError(f"{source}: encoder does not match the model ({problems})")
    model.load_state_dict(state, strict=False)
    return sorted(k for k in target if k not in state)


def load_encoder(
    encoder_dir: str | Path,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_path_rate: float = 0.0,
    pos_embed: str = "sincos",
) -> tuple[VisionTransformer, ViTSpec]:
    """Build the ViT described by ``encoder.json`` and load ``encoder.safetensors`` into it."""
    encoder_dir = Path(encoder_dir)
    spec = read_spec(encoder_dir)
    model = create_vit(
        spec, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate, pos_embed=pos_embed
    )
    load_encoder_into(model, load_safetensors(encoder_dir / ENCODER_WEIGHTS), str(encoder_dir / ENCODER_WEIGHTS))
    return model, spec
