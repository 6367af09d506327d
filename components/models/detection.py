"""The detector: torchvision Faster R-CNN (Ren et al. 2015) with a ResNet-FPN or a ViT backbone.

Soft Teacher (Xu et al. 2021, Sec. 4.1) uses Faster R-CNN with a ResNet-50-FPN; the small presets
(ResNet-18/34-FPN, narrower FPN and box head, small anchors) fit the embedded 128 px scenes on a CPU.
ResNets start from random weights by default; torchvision's ImageNet weights or a local state dict
are an opt-in (``pretrained``). Randomly initialised ResNets use GroupNorm (Wu & He 2018, who train
detectors from scratch with it), because torchvision's default FrozenBatchNorm2d is the identity
without pretrained statistics.

The ViT backbone is the encoder written by ``pretrain_mae`` / ``pretrain_ibot`` (``models/vit.py``)
with ViTDet's simple feature pyramid (Li et al. 2022, Sec. 3 and Fig. 2c): only the last feature
map (stride = patch size) is used, upsampled by deconvolutions (x4, x2), kept (x1) and max-pooled
(x0.5), each followed by a 1x1 and a 3x3 convolution with LayerNorm; a max-pooled extra level
feeds the RPN. The position embedding is resampled to each image's patch grid.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from components.io import load_safetensors, read_json, save_safetensors, torch_load, write_json
from components.models.vit import ViTSpec, create_vit, load_encoder

# Block type and blocks per stage (torchvision's, plus a one-block-per-stage ResNet-10 for CPUs).
RESNETS = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
}
BACKBONES = (*RESNETS, "vit")
NORMS = ("gn", "bn", "frozen_bn")
FEATURE_NAMES = ["0", "1", "2", "3"]  # pyramid levels pooled by RoIAlign; "pool" only feeds the RPN

DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_SPEC = "detector.json"


@dataclass(frozen=True)
class DetectorSpec:
    """Architecture of a detector; written next to its weights as JSON."""

    backbone: str  # resnet10 | resnet18 | resnet34 | resnet50 | vit
    num_classes: int  # foreground classes; torchvision adds background as label 0
    min_size: int = 800  # test-time resize (training views keep the size the data pipeline gives them)
    max_size: int = 1333
    norm: str = "gn"  # ResNet normalisation: gn | bn | frozen_bn (use frozen_bn with pretrained weights)
    width: int = 64  # ResNet stage widths width * (1, 2, 4, 8); 64 is torchvision's
    trainable_layers: int = 5  # ResNet stages left trainable (5 = all)
    fpn_channels: int = 256
    representation_size: int = 1024  # box head (TwoMLPHead) width
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per pyramid level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_detections_per_img: int = 100
    vit: dict | None = field(default=None)  # ViTSpec fields when backbone == "vit"
    image_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN  # input normalisation: ImageNet's (torchvision weights),
    image_std: tuple[float, ...] = IMAGENET_DEFAULT_STD  # or the one a pretrained ViT's encoder.json records

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.anchor_sizes) != len(FEATURE_NAMES) + 1:
            raise ValueError(
                f"anchor_sizes needs one size per pyramid level ({len(FEATURE_NAMES) + 1}), got "
                f"{list(self.anchor_sizes)}"
            )
        if self.width < 4:
            raise ValueError(f"width must be >= 4, got {self.width}")
        if self.backbone == "vit" and self.vit is None:
            raise ValueError("backbone 'vit' needs the encoder's ViTSpec fields in 'vit'")
        object.__setattr__(self, "anchor_sizes", tuple(int(s) for s in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "image_std" and min(value) <= 0):
                raise ValueError(f"{name} must be 3 numbers{' > 0' if name == 'image_std' else ''}, got {list(value)}")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["anchor_sizes"], d["aspect_ratios"] = list(self.anchor_sizes), list(self.aspect_ratios)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d


# --------------------------------------------------------------------------- ResNet-FPN
def _norm_layer(norm: str):
    """GroupNorm with 32 groups (Wu & He 2018), fewer for narrow layers (at least 4 channels a group)."""
    if norm == "gn":
        return lambda c: nn.GroupNorm(min(32, c // 4), c)
    return nn.BatchNorm2d if norm == "bn" else misc_nn_ops.FrozenBatchNorm2d


def create_resnet(name: str, width: int, norm_layer) -> resnet.ResNet:
    """torchvision's ResNet with stage widths ``width * (1, 2, 4, 8)`` (ImageNet stem: 7x7 stride 2 + max-pool)."""
    block, layers = RESNETS[name]
    body = resnet.ResNet(block, layers, norm_layer=norm_layer)
    if width != 64:
        body.inplanes = width
        body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        body.bn1 = norm_layer(width)
        for i, n in enumerate(layers):
            setattr(body, f"layer{i + 1}", body._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2))
        body.fc = nn.Linear(width * 8 * block.expansion, 1000)
    for m in body.modules():  # torchvision's init, again for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.GroupNorm | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return body


def resnet_fpn(spec: DetectorSpec, pretrained: str = "none") -> nn.Module:
    """ResNet with an FPN (Lin et al. 2017) over C2..C5 and a max-pooled P6: strides 4..64.

    ``pretrained``: ``"none"`` (random init), ``"torchvision"`` (torchvision's ImageNet weights, fetched
    from its hub on first use) or the path of a local ResNet state dict (``.safetensors``, or a
    ``torch.save`` file read with ``weights_only=True``).
    """
    if pretrained != "none" and spec.norm == "gn":
        raise ValueError(
            "pretrained ResNet weights have BatchNorm statistics; use norm 'frozen_bn' or 'bn', not 'gn' "
            f"({pretrained})"
        )
    if pretrained != "none" and (spec.width != 64 or spec.backbone == "resnet10"):
        raise ValueError(
            f"pretrained weights exist for torchvision's ResNets (width 64), not {spec.backbone} width {spec.width}"
        )
    norm_layer = _norm_layer(spec.norm)
    if pretrained == "torchvision":
        body = getattr(resnet, spec.backbone)(weights="DEFAULT", norm_layer=norm_layer)
    else:
        body = create_resnet(spec.backbone, spec.width, norm_layer)
    if pretrained not in ("none", "torchvision"):
        load_backbone_weights(body, pretrained)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: spec.trainable_layers] + (
        ["bn1"] if spec.trainable_layers == 5 else []
    )
    for name, p in body.named_parameters():
        if not name.startswith(tuple(trainable)):
            p.requires_grad_(False)
    in_channels = [body.inplanes // 8 * 2**i for i in range(4)]  # C2..C5 widths
    return BackboneWithFPN(
        body,
        {f"layer{k + 1}": name for k, name in enumerate(FEATURE_NAMES)},
        in_channels,
        spec.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a classification ResNet state dict (its ``fc`` ignored) into ``body``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    state = load_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    target = body.state_dict()
    # FrozenBatchNorm2d keeps no num_batches_tracked; a classifier's fc is not part of the backbone
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and k not in target)
    }
    bad = sorted(k for k in state if k not in target or target[k].shape != state[k].shape)
    missing = sorted(
        k for k in target if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )
    if bad or missing:
        raise ValueError(
            f"{path}: does not fit the ResNet (unexpected or mismatched: {bad[:4]}; missing: {missing[:4]})"
        )
    body.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- ViT + simple pyramid
PYRAMID_STRIDES = (4, 8, 16, 32)  # levels "0".."3", as the ResNet-FPN's C2..C5; "pool" adds 64


def rescale(dim: int, factor: float) -> tuple[nn.Module, int]:
    """ViTDet's rescaling of the last ViT map by ``factor`` (a power of 2): stride-2 deconvolutions
    (LayerNorm + GELU between two) to upsample, max-pooling to downsample; returns (module, width)."""
    if factor == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        ), dim // 4
    if factor == 2:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if factor == 1:
        return nn.Identity(), dim
    if factor < 1 and (1 / factor).is_integer():
        k = int(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k), dim
    raise ValueError(f"simple feature pyramid: cannot rescale a ViT map by {factor} (patch sizes 1-128, powers of 2)")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a ViT (Li et al. 2022, Sec. 3, Fig. 2c).

    Only the ViT's last map [B, D, H/p, W/p] is used: it is rescaled to strides 4, 8, 16 and 32
    (for ViT-B/16: x4, x2, x1, x0.5 as in the paper; for a patch-4 ViT: x1, x0.5, x0.25, x0.125), each
    level followed by a 1x1 and a 3x3 convolution with LayerNorm; a max-pooled level at stride 64
    ("pool") feeds the RPN, as with torchvision's FPN.
    """

    def __init__(self, vit: nn.Module, out_channels: int):
        super().__init__()
        self.vit = vit
        self.out_channels = out_channels
        dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        levels = []
        for stride in PYRAMID_STRIDES:
            scale, width = rescale(dim, self.patch_size / stride)
            levels.append(
                nn.Sequential(
                    scale,
                    nn.Conv2d(width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
        self.scales = nn.ModuleList(levels)

    def forward_vit(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, H/p, W/p]; H and W are padded up to a multiple of p."""
        vit, p = self.vit, self.patch_size
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
        x = vit.patch_embed.proj(images)  # [B, D, Gh, Gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, Gh*Gw, D]
        x = vit.patch_embed.norm(x)
        pos = resample_abs_pos_embed(vit.pos_embed, new_size=[gh, gw], num_prefix_tokens=1)  # [1, 1 + Gh*Gw, D]
        cls = vit.cls_token + pos[:, :1]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x + pos[:, 1:]], dim=1)  # [B, 1 + Gh*Gw, D]
        x = vit.norm(vit.blocks(vit.norm_pre(vit.pos_drop(x))))
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)  # [B, D, Gh, Gw]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.forward_vit(images)  # [B, D, H/p, W/p]
        out = OrderedDict((name, scale(x)) for name, scale in zip(FEATURE_NAMES, self.scales))  # strides 4, 8, 16, 32
        out["pool"] = F.max_pool2d(out[FEATURE_NAMES[-1]], kernel_size=1, stride=2)  # torchvision's LastLevelMaxPool
        return out


def vit_pyramid(spec: DetectorSpec, encoder_dir: str | Path | None = None) -> nn.Module:
    """The ViT encoder (random init, or loaded from ``encoder_dir``) under a simple feature pyramid."""
    vit_spec = ViTSpec(**spec.vit)
    if encoder_dir is not None:
        vit, loaded = load_encoder(encoder_dir)
        if loaded != vit_spec:
            raise ValueError(
                f"{Path(encoder_dir) / 'encoder.json'}: encoder {loaded.to_dict()} differs from the detector's vit "
                f"{spec.vit}"
            )
    else:
        vit = create_vit(vit_spec, pos_embed="sincos")
    vit.head = nn.Identity()
    return SimpleFeaturePyramid(vit, spec.fpn_channels)


# --------------------------------------------------------------------------- the detector
class Float32RPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs. Under bf16 autocast the convolutions give bf16, and
    torchvision decodes boxes in the deltas' dtype (``BoxCoder.decode_single``): proposals, the regression
    targets encoded against them, pseudo boxes and the jitter's box variance would all be rounded to
    bf16's 8-bit mantissa -- 1 px steps at 128-256 px, 4 px at 512-1024. Box coordinates stay float32, as
    mmdetection keeps them under mixed precision (``force_fp32`` on box decoding)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """The box predictor with float32 class scores and box deltas (see :class:`Float32RPNHead`)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


def create_detector(spec: DetectorSpec, pretrained: str = "none", encoder_dir: str | Path | None = None) -> FasterRCNN:
    """torchvision Faster R-CNN for ``spec``.

    Training views are used at the size the data pipeline made them (``_skip_resize``: the weak and
    strong views carry their own resize in their transform matrices); at test time images are resized
    to ``min_size``/``max_size`` and detections mapped back to the input image. The RPN head and box
    predictor return float32, so boxes are decoded in float32 under bf16/fp16 autocast.
    """
    if spec.backbone == "vit":
        if pretrained != "none":
            raise ValueError(
                "pretrained applies to ResNet backbones; a ViT backbone loads its encoder from encoder_dir"
            )
        backbone = vit_pyramid(spec, encoder_dir)
    else:
        if encoder_dir is not None:
            raise ValueError(f"encoder_dir is for the ViT backbone, not {spec.backbone}")
        backbone = resnet_fpn(spec, pretrained)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in spec.anchor_sizes), aspect_ratios=(spec.aspect_ratios,) * len(spec.anchor_sizes)
    )
    # Built in the order FasterRCNN builds its defaults (box head, predictor, then the RPN head), so a
    # seed gives the same initial weights as torchvision's own heads would.
    box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.representation_size)
    box_predictor = Float32BoxPredictor(spec.representation_size, spec.num_classes + 1)
    rpn_head = Float32RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    return FasterRCNN(
        backbone,
        min_size=spec.min_size,
        max_size=spec.max_size,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=FEATURE_NAMES, output_size=7, sampling_ratio=2),
        box_head=box_head,
        box_predictor=box_predictor,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        box_batch_size_per_image=spec.box_batch_size_per_image,
        rpn_pre_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        box_detections_per_img=spec.box_detections_per_img,
        _skip_resize=True,
    )


def save_detector(model: FasterRCNN, spec: DetectorSpec, out_dir: str | Path, **meta) -> Path:
    """Write ``detector.safetensors`` + ``detector.json`` ({"arch": "faster_rcnn", "spec": ..., meta...})."""
    out_dir = Path(out_dir)
    save_safetensors(out_dir / DETECTOR_WEIGHTS, model.state_dict())
    write_json(out_dir / DETECTOR_SPEC, {"arch": "faster_rcnn", "spec": spec.to_dict(), **meta})
    return out_dir


def load_detector(model_dir: str | Path) -> tuple[FasterRCNN, DetectorSpec, dict]:
    """Rebuild the detector from ``detector.json`` and load its weights; returns (model, spec, meta)."""
    model_dir = Path(model_dir)
    meta = read_json(model_dir / DETECTOR_SPEC)
    if meta.get("arch") != "faster_rcnn" or not isinstance(meta.get("spec"), dict):
        raise ValueError(f"{model_dir / DETECTOR_SPEC}: not a detector description (arch {meta.get('arch')!r})")
    try:
        spec = DetectorSpec(**meta["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{model_dir / DETECTOR_SPEC}: {e}") from None
    model = create_detector(spec)
    state = load_safetensors(model_dir / DETECTOR_WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{model_dir / DETECTOR_WEIGHTS}: weights do not match {DETECTOR_SPEC} ({str(e).splitlines()[0]})"
        ) from None
    return model, spec, {k: v for k, v in meta.items() if k not in ("arch", "spec")}
