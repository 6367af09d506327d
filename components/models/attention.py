"""Self-attention of the [CLS] token in a ViT's last block, and its figure (DINO, Caron et al. 2021,
Fig. 1 and ``visualize_attention.py``; iBOT Fig. 6 shows the same maps).

timm's blocks use fused scaled-dot-product attention, which never materialises the attention
matrix, so the last block's input is captured with a hook and its attention recomputed as
softmax(q k^T * scale) from the block's own ``qkv`` projection.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


@torch.no_grad()
def last_block_attention(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last block: [B, heads, 1 + L, 1 + L]."""
    block = model.blocks[-1]
    captured: dict[str, torch.Tensor] = {}
    handle = block.attn.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    was_training = model.training
    model.eval()
    try:
        model.forward_features(images)
    finally:
        handle.remove()
        model.train(was_training)
    x = captured["x"]  # [B, N, D], already through norm1
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, h, N, hd]
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, N, N]


@torch.no_grad()
def cls_attention_maps(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Attention of [CLS] to every patch in the last block, per head: [B, heads, G, G] (rows sum to
    at most 1; the remainder is [CLS] attending to itself)."""
    attn = last_block_attention(model, images)  # [B, h, N, N]
    gh, gw = model.patch_embed.grid_size
    return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], gh, gw)


def attention_figure(
    images: torch.Tensor, maps: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], title: str = ""
) -> plt.Figure:
    """One row per image: the image, then the [CLS] attention map of each head (nearest-upsampled
    to the image size, each map stretched to its own min-max range, as DINO's figures), with the
    map's peak share of attention written under it.

    ``images``: normalised [B, 3, H, W]; ``maps``: [B, heads, G, G]; ``mean``/``std``: the
    normalisation to undo for display.
    """
    B, heads = maps.shape[:2]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    pix = (images.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    up = torch.nn.functional.interpolate(maps.float().cpu(), size=images.shape[-2:], mode="nearest")  # [B, h, H, W]
    fig, axes = plt.subplots(B, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * B), squeeze=False)
    for i in range(B):
        axes[i, 0].imshow(pix[i])
        for j in range(heads):
            a = up[i, j].numpy()
            lo, hi = float(np.min(a)), float(np.max(a))
            axes[i, j + 1].imshow((a - lo) / max(hi - lo, 1e-12), cmap="inferno", vmin=0.0, vmax=1.0)
            axes[i, j + 1].text(
                0.5, -0.04, f"max {hi:.2f}", fontsize=6, ha="center", va="top", transform=axes[i, j + 1].transAxes
            )
            if i == 0:
                axes[i, j + 1].set_title(f"head {j}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    return fig
