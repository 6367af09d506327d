"""Multi-crop augmentation (DINO Sec. 3.1, iBOT Sec. 3.3) and the masked multi-crop dataset."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from components.data.masking import BlockMaskGenerator
from components.data.multicrop import MaskedMultiCropDataset, MultiCropAugmentation


def _image(seed: int = 0, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy())


@pytest.mark.parametrize("num_local", [0, 3])
def test_multicrop_yields_the_configured_numbers_and_sizes(num_local):
    aug = MultiCropAugmentation(global_size=32, local_size=16, num_local=num_local, blur_sigma=(0.1, 0.5))
    crops = aug(_image())
    assert len(crops) == 2 + num_local
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * num_local
    assert all(c.dtype == torch.float32 and type(c) is torch.Tensor for c in crops)


def test_crops_are_normalised_and_differ_between_views():
    aug = MultiCropAugmentation(
        global_size=32, local_size=16, num_local=2, blur_sigma=(0.1, 0.5), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    torch.manual_seed(0)
    crops = aug(_image(size=64))
    # values in [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25]
    assert all(float(c.min()) >= -2.0 - 1e-5 and float(c.max()) <= 2.0 + 1e-5 for c in crops)
    assert not torch.allclose(crops[0], crops[1])  # two different random views of one image
    assert not torch.allclose(crops[2], crops[3])


def test_augmentation_is_reproducible_from_the_torch_seed():
    aug = MultiCropAugmentation(global_size=32, local_size=16, num_local=2, blur_sigma=(0.1, 0.5))
    img = _image()
    torch.manual_seed(5)
    a = aug(img)
    torch.manual_seed(5)
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_first_global_crop_is_always_blurred():
    # A one-pixel checkerboard keeps all its contrast under crops, flips and jitter, but not under blur
    # (p = 1.0 on the first global crop, 0.1 on the second, as in DINO).
    board = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2 * 255).to(torch.uint8)
    img = Image.fromarray(board.unsqueeze(-1).expand(32, 32, 3).contiguous().numpy())
    aug = MultiCropAugmentation(
        global_size=32, local_size=16, num_local=0, global_scale=(1.0, 1.0), blur_sigma=(1.0, 1.0)
    )
    torch.manual_seed(0)
    stds = torch.tensor([[float(c.std()) for c in aug(img)] for _ in range(20)])  # [20, 2]
    assert float(stds[:, 0].max()) < 0.5 * float(stds[:, 1].max())


def test_colour_jitter_strengths_are_parameters():
    # grayscale_p 1: every crop grey (equal channels under an equal per-channel normalisation);
    # no jitter and no grayscale: a uniformly coloured image keeps its colour in every crop.
    img = Image.new("RGB", (32, 32), (200, 40, 90))
    norm = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    grey = MultiCropAugmentation(
        global_size=16, local_size=8, num_local=2, blur_sigma=(0.1, 0.5), grayscale_p=1.0, **norm
    )
    plain = MultiCropAugmentation(
        global_size=16, local_size=8, num_local=2, blur_sigma=(0.1, 0.5), color_jitter_p=0.0, grayscale_p=0.0, **norm
    )
    torch.manual_seed(0)
    for _ in range(5):
        for c in grey(img):
            assert torch.allclose(c[0], c[1], atol=1e-5) and torch.allclose(c[1], c[2], atol=1e-5)
        crops = plain(img)
        for c in crops[:1] + crops[2:]:  # (the second global crop may be solarised, as in DINO)
            rgb = c.mean((1, 2)) * 0.25 + 0.5
            assert torch.allclose(rgb, torch.tensor([200, 40, 90]) / 255, atol=2 / 255)


def test_masked_dataset_pairs_each_global_crop_with_a_mask_and_collates():
    base = [(_image(i), i % 2) for i in range(4)]
    aug = MultiCropAugmentation(global_size=32, local_size=16, num_local=3, blur_sigma=(0.1, 0.5))
    ds = MaskedMultiCropDataset(base, aug, BlockMaskGenerator(prob=1.0, ratio_range=(0.3, 0.3)), patch_size=4)
    item = ds[0]
    assert len(item["global"]) == 2 and len(item["local"]) == 3 and len(item["masks"]) == 2
    assert all(m.shape == (8, 8) and m.dtype == torch.bool and m.any() for m in item["masks"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert [tuple(t.shape) for t in batch["global"]] == [(4, 3, 32, 32)] * 2
    assert [tuple(t.shape) for t in batch["local"]] == [(4, 3, 16, 16)] * 3
    assert [tuple(t.shape) for t in batch["masks"]] == [(4, 8, 8)] * 2


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="global crops"):
        MultiCropAugmentation(num_global=3)
    aug = MultiCropAugmentation(global_size=30, local_size=16, num_local=1)
    with pytest.raises(ValueError, match="not divisible"):
        MaskedMultiCropDataset([], aug, BlockMaskGenerator(), patch_size=4)
