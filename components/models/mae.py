"""Masked Autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

One class, one method per step of the paper, named as in facebookresearch/mae ``models_mae.py``:
``patchify`` / ``unpatchify`` (Sec. 3, "reconstruction target"), ``random_masking`` (Sec. 3,
"masking": per-sample shuffle by argsort of uniform noise), ``forward_encoder`` (Sec. 3, "MAE encoder":
a ViT on the visible patches only), ``forward_decoder`` (Sec. 3, "MAE decoder": mask tokens, full set
of tokens, fixed position embeddings, a lightweight Transformer), ``forward_loss`` (MSE on the masked
patches only, optionally on per-patch normalised pixels, Sec. 3 and Table 1c).

The encoder is the project's shared timm ``VisionTransformer`` (``components.models.vit.create_vit``),
held as ``self.encoder`` so ``save_encoder(mae.encoder, spec, dir)`` writes the format every later
stage loads. Its blocks use timm's fused scaled-dot-product attention.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from components.models.vit import ViTSpec, create_vit, sincos_2d

NORM_PIX_EPS = 1e-6


def normalize_patches(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """``norm_pix_loss`` target: each patch's pixels to zero mean and unit variance (unbiased var, as MAE)."""
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    var = target.var(dim=-1, keepdim=True)  # [N, L, 1]
    return (target - mean) / (var + eps) ** 0.5


class MaskedAutoencoder(nn.Module):
    """MAE with the shared ViT encoder and a lightweight decoder of timm ``Block``s.

    ``forward(imgs, mask_ratio, noise=None) -> (loss, pred, mask)`` with ``pred`` [N, L, p*p*C] in
    the target's space (per-patch normalised pixels when ``norm_pix_loss``) and ``mask`` [N, L]
    (1 = removed, 0 = visible) in the original patch order.
    """

    def __init__(
        self,
        spec: ViTSpec,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads {decoder_num_heads}"
            )
        if decoder_embed_dim % 4:
            raise ValueError(
                f"decoder_embed_dim {decoder_embed_dim} must be divisible by 4 (2D sin-cos position embedding)"
            )
        self.spec = spec
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        # --- encoder: patch embed, fixed sin-cos pos embed (zero cls row), blocks, LayerNorm(eps 1e-6)
        self.encoder = create_vit(spec, num_classes=0, global_pool="token", pos_embed="sincos_fixed")
        # --- decoder
        self.decoder_embed = nn.Linear(spec.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, spec.grid_size, cls_token=True), requires_grad=False
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, spec.patch_size**2 * spec.in_chans)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE init: xavier_uniform Linear layers (the patch-embed conv viewed as a Linear), zero
        biases, unit LayerNorms, normal(0.02) cls and mask tokens; position embeddings stay sin-cos."""
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # ------------------------------------------------------------------ pixels <-> patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], patch pixels ordered (p, q, c) (``nchpwq -> nhwpqc``)."""
        p, c = self.spec.patch_size, self.spec.in_chans
        n, _, h_px, w_px = imgs.shape
        if imgs.shape[1] != c or h_px % p or w_px % p:
            raise ValueError(f"images of shape {tuple(imgs.shape)} do not split into {c}-channel {p}x{p} patches")
        h, w = h_px // p, w_px // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W] (inverse of :meth:`patchify`; square grids)."""
        p, c = self.spec.patch_size, self.spec.in_chans
        n, length, _ = x.shape
        h = w = int(round(length**0.5))
        if h * w != length or x.shape[-1] != p * p * c:
            raise ValueError(
                f"patch tensor of shape {tuple(x.shape)} is not a square grid of {c}-channel {p}x{p} patches"
            )
        x = x.reshape(n, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, w * p)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by sorting uniform noise (Sec. 3, "Masking").

        Keeps the ``int(L * (1 - mask_ratio))`` patches with the smallest noise. Returns the kept
        tokens [N, K, D], the binary ``mask`` [N, L] (1 = removed) in the original order, and
        ``ids_restore`` [N, L] that undoes the shuffle. ``noise`` [N, L] may be given (tests, analysis).
        """
        n, length, d = x.shape  # [N, L, D]
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]  # [N, K]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, K, D]
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L], back to patch order
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ encoder / decoder
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Embed patches, add position embeddings, drop the masked ones, encode the visible ones."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D]
        x = x + enc.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1 + K, D]
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = enc.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens fill the removed places, unshuffle, decode, predict p*p*C pixels per patch."""
        x = self.decoder_embed(x)  # [N, 1 + K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)  # [N, L - K, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [N, L, Dd] patch order
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, Dd]
        x = x + self.decoder_pos_embed
        x = self.decoder_blocks(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1 + L, p*p*C]
        return x[:, 1:, :]  # drop cls: [N, L, p*p*C]

    # ------------------------------------------------------------------ loss
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target [N, L, p*p*C]: patch pixels, normalised per patch with norm_pix_loss."""
        t = self.patchify(imgs.float())
        return normalize_patches(t) if self.norm_pix_loss else t

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only (computed in fp32)."""
        loss = (pred.float() - self.target(imgs)) ** 2
        loss = loss.mean(dim=-1)  # [N, L] per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def mae_flops_per_image(
    spec: ViTSpec, decoder_embed_dim: int, decoder_depth: int, mask_ratio: float, decoder_mlp_ratio: float = 4.0
) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of one image through the MAE: patch embed on all
    L patches, encoder blocks on 1 + K tokens, decoder blocks on 1 + L tokens, prediction head.
    Training costs about 3x this (forward + backward)."""

    def blocks(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
        # qkv (3 D^2) + proj (D^2) + mlp (2 r D^2) matmuls, plus QK^T and AV (2 T^2 D)
        per_block = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
        return depth * per_block

    length = spec.num_patches
    keep = int(length * (1 - mask_ratio))
    patch_dim = spec.patch_size**2 * spec.in_chans
    flops = 2 * length * patch_dim * spec.embed_dim  # patch embedding
    flops += blocks(1 + keep, spec.embed_dim, spec.depth, spec.mlp_ratio)
    flops += 2 * (1 + keep) * spec.embed_dim * decoder_embed_dim  # decoder_embed
    flops += blocks(1 + length, decoder_embed_dim, decoder_depth, decoder_mlp_ratio)
    flops += 2 * (1 + length) * decoder_embed_dim * patch_dim  # decoder_pred
    return float(flops)
