"""BEiT block-wise masking as iBOT uses it (Bao et al. 2021 Alg. 1; Zhou et al. 2021 Sec. 3.3)."""

import math

import pytest
import torch

from components.data.masking import BlockMaskGenerator, block_mask


@pytest.mark.parametrize("grid,ratio", [(14, 0.4), (14, 0.1), (8, 0.5), (8, 0.25)])
def test_block_mask_reaches_the_requested_ratio(grid, ratio):
    g = torch.Generator().manual_seed(0)
    target = ratio * grid * grid
    counts = [int(block_mask(grid, grid, target, generator=g)[0].sum()) for _ in range(60)]
    # Never more than requested (each block adds at most what is still missing) ...
    assert max(counts) <= math.floor(target)
    # ... and on average within 15 % of it (the search may stop a little short, as in BEiT; at 0.1 on
    # a 14x14 grid one minimum block is already 16 of the 19.6 patches).
    assert sum(counts) / len(counts) >= 0.85 * target


def test_block_mask_is_the_union_of_rectangles_of_bounded_shape():
    g = torch.Generator().manual_seed(1)
    grid = 14
    min_area = (grid // 3) ** 2  # 16 on the 14x14 grid, as in iBOT
    for _ in range(30):
        target = 0.45 * grid * grid
        mask, blocks = block_mask(grid, grid, target, generator=g)
        union = torch.zeros_like(mask)
        assert blocks
        for top, left, h, w in blocks:
            assert top >= 0 and top + h <= grid and left >= 0 and left + w <= grid
            remaining = target - int(union.sum())
            union[top : top + h, left : left + w] = True
            # area drawn from U(16, remaining) (just the remainder once fewer than 16 are missing) and
            # aspect from (0.3, 1/0.3), up to the rounding of h and w to integers
            area = min(min_area, remaining)
            assert h * w >= area - math.sqrt(area / 0.3)
            if area >= 4:
                assert 0.3 / 2 <= h / w <= 2 / 0.3
        assert torch.equal(union, mask)


def test_a_single_block_mask_is_a_filled_rectangle():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        # area U(16, 16) with aspect 1: exactly one 4x4 block at a random place
        mask, blocks = block_mask(14, 14, 16, aspect_range=(1.0, 1.0), generator=g)
        assert len(blocks) == 1 and blocks[0][2:] == (4, 4)
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert bool(box.all())  # bounding box completely filled: a rectangle
        assert int(mask.sum()) == box.numel()


def test_generator_masks_with_the_requested_probability_and_ratio_range():
    g = torch.Generator().manual_seed(3)
    gen = BlockMaskGenerator(prob=0.5, ratio_range=(0.1, 0.5))
    masks = [gen(14, 14, generator=g) for _ in range(200)]
    ratios = torch.tensor([float(m.float().mean()) for m in masks])
    unmasked = float((ratios == 0).float().mean())
    assert 0.38 <= unmasked <= 0.62  # Binomial(200, 0.5): +- 3.4 sigma
    masked = ratios[ratios > 0]
    assert float(masked.max()) <= 0.5 and float(masked.min()) >= 0.05
    assert float(masked.std()) > 0.05  # the ratio is drawn per crop, not fixed

    assert all(not BlockMaskGenerator(prob=0.0)(8, 8).any() for _ in range(5))
    assert all(BlockMaskGenerator(prob=1.0, ratio_range=(0.3, 0.3))(8, 8).any() for _ in range(5))


def test_masks_are_reproducible_from_the_seed():
    gen = BlockMaskGenerator(prob=1.0)
    a = [gen(14, 14, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.manual_seed(7)
    b = gen(14, 14)
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], b)


@pytest.mark.parametrize(
    "kwargs",
    [dict(prob=1.5), dict(ratio_range=(0.5, 0.1)), dict(ratio_range=(0.1, 1.0)), dict(aspect_range=(0.0, 2.0))],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kwargs)
