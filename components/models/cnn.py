"""The CNN baseline: a torchvision ResNet adapted to small images.

He et al. 2016's ResNet opens with a 7x7 stride-2 convolution and a stride-2 max-pool, which turns a
32 px image into an 8x8 map before the first residual block. For small images we use the CIFAR stem
of the same paper (Sec. 4.2): one 3x3 stride-1 convolution and no max-pool, so layer1 sees the full
resolution. ``width`` scales every stage (64 is torchvision's), so the baseline can be made as
cheap as the small ViTs it is compared against (Raghu et al. 2021 compare ViTs with ResNets by CKA).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# Block type and blocks per stage, as in torchvision (plus a one-block-per-stage resnet10).
CNN_PRESETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

# Images up to this size get the 3x3 stride-1 stem without max-pool.
SMALL_IMAGE_MAX = 64


def _init_resnet(model: ResNet, zero_init_residual: bool) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, and
    optionally the last BN of every residual branch at 0 (Goyal et al. 2017)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def create_cnn(
    name: str,
    num_classes: int,
    img_size: int,
    width: int = 64,
    zero_init_residual: bool = True,
) -> ResNet:
    """A torchvision ``ResNet`` named by ``name`` with stage widths ``width * (1, 2, 4, 8)``.

    Images of at most ``SMALL_IMAGE_MAX`` px get the CIFAR stem (3x3 stride-1 conv, no max-pool).
    """
    if name not in CNN_PRESETS:
        raise KeyError(f"unknown CNN {name!r}; known: {', '.join(CNN_PRESETS)}")
    if width < 1 or num_classes < 1:
        raise ValueError(f"create_cnn: width ({width}) and num_classes ({num_classes}) must be positive")
    block, layers = CNN_PRESETS[name]
    model = ResNet(block, layers, num_classes=num_classes)
    small = img_size <= SMALL_IMAGE_MAX
    if width != 64 or small:
        model.inplanes = width
        model.conv1 = (
            nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            if small
            else nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        )
        model.bn1 = nn.BatchNorm2d(width)
        if small:
            model.maxpool = nn.Identity()
        for i, blocks in enumerate(layers):
            setattr(model, f"layer{i + 1}", model._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
        model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    _init_resnet(model, zero_init_residual)
    return model


def residual_blocks(model: ResNet) -> list[tuple[str, nn.Module]]:
    """The residual blocks in forward order, named as in ``model.named_modules()`` ("layer1.0", ...).

    Their outputs are the representations CKA compares layer by layer (Raghu et al. 2021, Sec. 3).
    """
    return [(f"layer{i}.{j}", blk) for i in range(1, 5) for j, blk in enumerate(getattr(model, f"layer{i}"))]
