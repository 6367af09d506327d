"""Multi-crop augmentation (DINO, Caron et al. 2021, Sec. 3.1 and App. "Data augmentation"), as iBOT
uses it (Zhou et al. 2021, Sec. 3.3; ``main_ibot.py: DataAugmentationiBOT``), and the dataset that
pairs the two global crops with their block-wise masks.

Two global crops (RandomResizedCrop to ``global_size``, scale (0.25, 1) in iBOT, bicubic) and
``num_local`` local crops (``local_size``, scale (0.05, 0.25)); every crop is flipped, colour-jittered
(0.4, 0.4, 0.2, 0.1 with p 0.8) and turned to grayscale with p 0.2. Gaussian blur with p 1.0 on the
first global crop, 0.1 on the second and 0.5 on local crops; solarisation (threshold 128) with p 0.2 on
the second global crop only. DINO blurs with sigma in (0.1, 2.0) px at 224 px; ``blur_sigma`` is a
parameter so smaller images can keep the same relative blur. The jitter strengths are parameters too
(``color_jitter``, ``color_jitter_p``, ``grayscale_p``): DINO tuned them to ImageNet, where colour says
something about the object; where colours are drawn independently of the class, two crops of one
image can be matched by colour alone, and grayscale crops remove that shortcut (the CPU default on the
shapes turns every crop grayscale).

The transforms work on PIL images, as DINO's do (several times faster than tensor kernels on
small crops). All randomness is torch's global RNG, which the project's loader seeds per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from components.data.masking import BlockMaskGenerator


class GaussianBlur:
    """DINO's ``utils.GaussianBlur``: with probability ``p``, PIL Gaussian blur of radius ~ U(sigma)."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class MultiCropAugmentation:
    """``__call__(image) -> [global_1, global_2, local_1, ..., local_n]`` (float tensors [3, S, S],
    normalised). ``image``: a PIL image or a uint8 tensor [3, H, W]."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_global: int = 2,
        hflip: float = 0.5,
        blur_p: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_p: float = 0.2,
    ) -> None:
        """DINO's ``DataAugmentationDINO`` with its probabilities as arguments (paper values by default):
        flip ``hflip``; blur ``blur_p`` for global 1, global 2 and the local crops; solarization
        ``solarize_p`` on global 2. A probability of 0 leaves the transform out."""
        if num_global != 2:
            raise ValueError(f"iBOT uses exactly 2 global crops (each is the other's teacher view), got {num_global}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        self.num_global, self.num_local = num_global, num_local
        self.global_size, self.local_size = global_size, local_size
        brightness, contrast, saturation, hue = color_jitter
        flip_and_color_jitter = [
            *([v2.RandomHorizontalFlip(p=hflip)] if hflip > 0 else []),
            *(
                [
                    v2.RandomApply(
                        [v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)],
                        p=color_jitter_p,
                    )
                ]
                if color_jitter_p > 0
                else []
            ),
            *([v2.RandomGrayscale(p=grayscale_p)] if grayscale_p > 0 else []),
        ]
        normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)

        def blur(p: float) -> list:
            return [GaussianBlur(p, blur_sigma)] if p > 0 else []

        solarize = [v2.RandomSolarize(threshold=128, p=solarize_p)] if solarize_p > 0 else []
        self.global_1 = v2.Compose(
            [crop(global_size, global_scale), *flip_and_color_jitter, *blur(blur_p[0]), *normalize]
        )
        self.global_2 = v2.Compose(
            [crop(global_size, global_scale), *flip_and_color_jitter, *blur(blur_p[1]), *solarize, *normalize]
        )
        self.local = v2.Compose([crop(local_size, local_scale), *flip_and_color_jitter, *blur(blur_p[2]), *normalize])

    def __call__(self, image) -> list[torch.Tensor]:
        if isinstance(image, torch.Tensor):
            image = v2.functional.to_pil_image(image)
        image = image.convert("RGB")
        crops = [self.global_1(image), self.global_2(image)]
        crops += [self.local(image) for _ in range(self.num_local)]
        return [c.as_subclass(torch.Tensor) for c in crops]


class MaskedMultiCropDataset(Dataset):
    """Unlabeled iBOT views of ``dataset`` (items ``(image, label)`` or ``image``; labels dropped).

    Item: ``{"global": [2 x [3, Sg, Sg]], "local": [n x [3, Sl, Sl]], "masks": [2 x bool [G, G]]}``
    with G = Sg / patch_size; one block-wise mask per global crop (iBOT masks global crops only).
    """

    def __init__(
        self, dataset: Dataset, augment: MultiCropAugmentation, mask_generator: BlockMaskGenerator, patch_size: int
    ) -> None:
        if augment.global_size % patch_size:
            raise ValueError(f"global crop size {augment.global_size} is not divisible by patch_size {patch_size}")
        if augment.local_size % patch_size:
            raise ValueError(f"local crop size {augment.local_size} is not divisible by patch_size {patch_size}")
        self.dataset, self.augment, self.mask_generator = dataset, augment, mask_generator
        self.grid = augment.global_size // patch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        crops = self.augment(image)
        n_glob = self.augment.num_global
        masks = [self.mask_generator(self.grid, self.grid) for _ in range(n_glob)]
        return {"global": crops[:n_glob], "local": crops[n_glob:], "masks": masks}
