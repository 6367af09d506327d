"""Block-wise masking of the patch grid (BEiT, Bao et al. 2021, Alg. 1), as iBOT uses it.

iBOT (Zhou et al. 2021, Sec. 3.3 and App. B; ``loader.py: ImageFolderMask``) masks each global crop
with probability ``prob``; a masked crop draws its ratio r ~ U(ratio_range) and then adds random
rectangles until r * H * W patches are masked. Each rectangle has an area drawn from
U(min_block_area, patches still to mask) and an aspect ratio drawn log-uniformly from
``aspect_range`` (0.3, 1/0.3); ``min_block_area`` defaults to (min(H, W) // 3) ** 2, which is 16 on
ViT-B/16's 14x14 grid. A rectangle is placed only where it adds between 1 and the remaining number
of patches, and the search gives up after 10 failed draws, so the reached ratio can fall slightly
short of the target, as in the original.

All randomness comes from torch (``generator`` or the global RNG) so the per-sample seeding of the
data loader makes masks reproducible.
"""

from __future__ import annotations

import math

import torch


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def block_mask(
    height: int,
    width: int,
    num_masking_patches: float,
    min_block_area: int | None = None,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """BEiT block-wise masking of an ``height x width`` grid.

    Returns the mask (bool [H, W], True = masked) and the rectangles drawn, each as
    ``(top, left, h, w)``; the mask is exactly their union.
    """
    if min_block_area is None:
        min_block_area = (min(height, width) // 3) ** 2
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    mask = torch.zeros(height, width, dtype=torch.bool)  # [H, W]
    blocks: list[tuple[int, int, int, int]] = []
    count = 0
    while count < num_masking_patches:
        remaining = num_masking_patches - count
        delta = 0
        for _ in range(max_attempts):
            target_area = _uniform(min_block_area, remaining, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = _randint(0, height - h, generator)
                left = _randint(0, width - w, generator)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= remaining:
                    mask[top : top + h, left : left + w] = True
                    blocks.append((top, left, h, w))
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask, blocks


class BlockMaskGenerator:
    """Draws one iBOT mask for a patch grid: unmasked with probability ``1 - prob``, otherwise
    block-wise with a ratio drawn from ``ratio_range`` (iBOT: prob 0.5, ratio U(0.1, 0.5))."""

    def __init__(
        self,
        prob: float = 0.5,
        ratio_range: tuple[float, float] = (0.1, 0.5),
        aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
        min_block_area: int | None = None,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mask probability must lie in [0, 1], got {prob}")
        if not 0.0 <= ratio_range[0] <= ratio_range[1] < 1.0:
            raise ValueError(f"mask ratio range must satisfy 0 <= low <= high < 1, got {ratio_range}")
        if not 0.0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"aspect range must satisfy 0 < low <= high, got {aspect_range}")
        self.prob = prob
        self.ratio_range = ratio_range
        self.aspect_range = aspect_range
        self.min_block_area = min_block_area

    def draw_ratio(self, generator: torch.Generator | None = None) -> float:
        """0 with probability ``1 - prob``, else r ~ U(ratio_range)."""
        if torch.rand((), generator=generator).item() >= self.prob:
            return 0.0
        return _uniform(*self.ratio_range, generator)

    def __call__(self, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A bool mask [height, width] (True = replaced by the mask embedding)."""
        ratio = self.draw_ratio(generator)
        if ratio == 0.0:
            return torch.zeros(height, width, dtype=torch.bool)
        mask, _ = block_mask(
            height, width, ratio * height * width, self.min_block_area, self.aspect_range, generator=generator
        )
        return mask
