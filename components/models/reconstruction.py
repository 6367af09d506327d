"""MAE reconstructions for display (He et al. 2021, Fig. 2-4): original | masked | reconstruction |
reconstruction with the visible patches pasted back.

With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels, which look like noise if
shown as they are (facebookresearch/mae issues #153, #197). For display each predicted patch is
un-normalised with the mean and standard deviation of the same patch of the original image — the
only place those statistics exist — so the figure shows structure the decoder predicted, at the
brightness of the original patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from components.models.mae import NORM_PIX_EPS, MaskedAutoencoder

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(
    mae: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Run ``mae`` on ``imgs`` [N, C, H, W] (normalised input space) and return the four panels,
    each [N, C, H, W] in the same space, plus ``mask`` [N, L] and the masked-patch ``loss``."""
    was_training = mae.training
    mae.eval()
    try:
        imgs = imgs.float()
        loss, pred, mask = mae(imgs, mask_ratio=mask_ratio, noise=noise)  # pred [N, L, p*p*C], mask [N, L]
    finally:
        mae.train(was_training)
    pred = pred.float()
    patches = mae.patchify(imgs)  # [N, L, p*p*C]
    if mae.norm_pix_loss:
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
        pred = pred * std + mean  # un-normalise each patch with the original patch's statistics
    keep = (1 - mask).unsqueeze(-1)  # [N, L, 1], 1 = visible
    return {
        "original": imgs,
        "masked": mae.unpatchify(patches * keep),
        "reconstruction": mae.unpatchify(pred),
        "reconstruction + visible": mae.unpatchify(patches * keep + pred * (1 - keep)),
        "mask": mask,
        "loss": loss.detach(),
    }


def to_display(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalisation: [N, C, H, W] -> [N, H, W, C] floats in [0, 1]."""
    m = torch.tensor(mean, dtype=imgs.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=imgs.dtype).view(1, -1, 1, 1)
    return (imgs.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def pixel_mask(mask: torch.Tensor, img_size: int) -> np.ndarray:
    """Patch mask [N, L] (square grid) -> pixel mask [N, H, W, 1]."""
    n, length = mask.shape
    grid = int(round(length**0.5))
    m = mask.reshape(n, grid, grid).float().cpu()
    m = m.repeat_interleave(img_size // grid, dim=1).repeat_interleave(img_size // grid, dim=2)  # [N, H, W]
    return m.unsqueeze(-1).numpy()


def plot_reconstructions(
    panels: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float], title: str = ""
) -> Figure:
    """A grid with one row per image and the columns of :data:`PANELS`; masked patches are shown grey."""
    removed = pixel_mask(panels["mask"], panels["original"].shape[-1])  # [N, H, W, 1], 1 = removed
    shown = {name: to_display(panels[name], mean, std) for name in PANELS}
    shown["masked"] = np.where(removed > 0, 0.5, shown["masked"])  # removed patches in grey
    n = panels["original"].shape[0]
    fig = Figure(figsize=(2.0 * len(PANELS), 2.0 * n + (0.4 if title else 0)), dpi=100)
    axes = fig.subplots(n, len(PANELS), squeeze=False)
    for row in range(n):
        for col, name in enumerate(PANELS):
            ax = axes[row][col]
            ax.imshow(shown[name][row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
