"""The detector factory: ResNet-FPN and ViT + simple feature pyramid backbones, weight loading, I/O."""

import pytest
import torch
from torchvision.models import resnet18

from components.io import save_safetensors
from components.models.detection import (
    DetectorSpec,
    SimpleFeaturePyramid,
    create_detector,
    load_detector,
    save_detector,
)
from components.models.vit import ViTSpec, create_vit, save_encoder

VIT = ViTSpec(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def spec(**kw):
    base = dict(
        backbone="resnet18",
        num_classes=3,
        min_size=64,
        max_size=64,
        fpn_channels=32,
        representation_size=32,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
        rpn_post_nms_top_n_train=50,
        rpn_post_nms_top_n_test=50,
        box_detections_per_img=10,
    )
    return DetectorSpec(**{**base, **kw})


def targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])}]


@pytest.mark.parametrize("kw", [{}, {"backbone": "vit", "vit": VIT.to_dict()}])
def test_detector_trains_and_detects(kw):
    torch.manual_seed(0)
    model = create_detector(spec(**kw)).train()
    losses = model([torch.rand(3, 64, 64)], targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "box_predictor" in n)
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 48, 80)])
    assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 10
    assert (det["boxes"][:, 2] <= 80).all() and (det["boxes"][:, 3] <= 48).all()  # mapped back to the input image


def test_boxes_are_decoded_in_float32_under_bf16_autocast():
    """The heads hand float32 deltas to torchvision's box decoding, so proposals and detections keep
    sub-pixel coordinates under bf16 autocast (in bf16 they would be multiples of 4 px at 512-1024 px)."""
    torch.manual_seed(0)
    model = create_detector(spec(min_size=1024, max_size=1024, box_detections_per_img=50)).eval()
    images = [torch.rand(3, 1024, 1024)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        (det,) = model(images)
    assert next(iter(features.values())).dtype == torch.bfloat16  # autocast is on
    assert proposals[0].dtype == det["boxes"].dtype == det["scores"].dtype == torch.float32
    big = proposals[0][proposals[0] > 512]
    assert len(big) > 20 and (big % 4 != 0).float().mean() > 0.5, big[:10]


def test_a_seed_gives_the_initial_weights_of_torchvisions_own_heads():
    """The float32 heads are built in FasterRCNN's order, so a seed initialises exactly as torchvision's
    default heads did (the default run's detector does not change with the heads' class)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from components.models.detection import FEATURE_NAMES, resnet_fpn

    s = spec()
    torch.manual_seed(0)
    ours = create_detector(s).state_dict()
    torch.manual_seed(0)
    backbone = resnet_fpn(s, "none")
    anchors = AnchorGenerator(
        sizes=tuple((a,) for a in s.anchor_sizes), aspect_ratios=(s.aspect_ratios,) * len(s.anchor_sizes)
    )
    plain = FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(FEATURE_NAMES, 7, 2),
        box_head=TwoMLPHead(s.fpn_channels * 49, s.representation_size),
        box_predictor=FastRCNNPredictor(s.representation_size, s.num_classes + 1),
    ).state_dict()
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_the_input_normalisation_is_the_specs_and_survives_save_and_load(tmp_path):
    """A pretrained ViT's detector normalises its input as the encoder was trained (encoder.json)."""
    s = spec(image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    model = create_detector(s)
    assert model.transform.image_mean == [0.5, 0.4, 0.3] and model.transform.image_std == [0.2, 0.25, 0.3]
    save_detector(model, s, tmp_path)
    loaded, loaded_spec, _ = load_detector(tmp_path)
    assert loaded_spec == s and loaded.transform.image_std == [0.2, 0.25, 0.3]
    assert create_detector(spec()).transform.image_mean == [0.485, 0.456, 0.406]  # torchvision's ImageNet default
    with pytest.raises(ValueError, match="image_std must be 3 numbers > 0"):
        spec(image_std=(0.2, 0.0, 0.3))


def test_training_views_keep_their_size():
    """Training images are not resized (the views carry their own resize in their matrices)."""
    model = create_detector(spec(min_size=64, max_size=64)).train()
    images, t = model.transform([torch.rand(3, 40, 52)], targets())
    assert images.image_sizes == [(40, 52)] and torch.equal(t[0]["boxes"], targets()[0]["boxes"])


def test_resnet_fpn_levels_have_strides_4_to_64():
    backbone = create_detector(spec()).backbone
    feats = backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    assert all(f.shape[1] == 32 for f in feats.values())


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_simple_feature_pyramid_has_strides_4_to_64_for_any_patch_and_image_size(patch):
    vit = ViTSpec(img_size=32, patch_size=patch, embed_dim=32, depth=1, num_heads=2)
    pyramid = create_detector(spec(backbone="vit", vit=vit.to_dict())).backbone
    assert isinstance(pyramid, SimpleFeaturePyramid)
    feats = pyramid(torch.rand(2, 3, 128, 192))  # not the encoder's 32 px: position embedding resampled
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [
        (32, 48),
        (16, 24),
        (8, 12),
        (4, 6),
        (2, 3),
    ]  # strides 4 ... 64
    assert all(f.shape[:2] == (2, 32) for f in feats.values())


def test_vit_backbone_loads_the_pretrained_encoder(tmp_path):
    torch.manual_seed(1)
    vit = create_vit(VIT)
    save_encoder(vit, VIT, tmp_path / "enc")
    det = create_detector(spec(backbone="vit", vit=VIT.to_dict()), encoder_dir=tmp_path / "enc")
    assert torch.equal(det.backbone.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert torch.equal(det.backbone.vit.pos_embed, vit.pos_embed)
    # on the encoder's own grid the pyramid's ViT pass equals timm's forward_features (minus [CLS])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = det.backbone.forward_vit(x)  # [1, D, 4, 4]
        theirs = vit.eval().forward_features(x)[:, 1:]  # [1, 16, D]
    assert torch.allclose(ours.flatten(2).transpose(1, 2), theirs, atol=1e-5)
    other = ViTSpec(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="differs from the detector"):
        create_detector(spec(backbone="vit", vit=other.to_dict()), encoder_dir=tmp_path / "enc")


def test_resnet_weights_from_a_local_file(tmp_path):
    torch.manual_seed(2)
    source = resnet18()
    save_safetensors(tmp_path / "r18.safetensors", source.state_dict())
    det = create_detector(spec(norm="frozen_bn"), pretrained=str(tmp_path / "r18.safetensors"))
    body = det.backbone.body
    assert torch.equal(body.conv1.weight, source.conv1.weight)
    assert torch.equal(body.layer3[0].bn1.running_var, source.layer3[0].bn1.running_var)
    with pytest.raises(ValueError, match="GroupNorm|'gn'"):
        create_detector(spec(norm="gn"), pretrained=str(tmp_path / "r18.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_detector(spec(norm="frozen_bn"), pretrained=str(tmp_path / "missing.safetensors"))
    save_safetensors(tmp_path / "bad.safetensors", {"conv1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="bad.safetensors: does not fit"):
        create_detector(spec(norm="frozen_bn"), pretrained=str(tmp_path / "bad.safetensors"))


def test_trainable_layers_freeze_the_stem_first():
    det = create_detector(spec(trainable_layers=3))
    body = det.backbone.body
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(3)
    s = spec(backbone="vit", vit=VIT.to_dict())
    model = create_detector(s).eval()
    save_detector(model, s, tmp_path / "det", classes=["a", "b", "c"])
    loaded, s2, meta = load_detector(tmp_path / "det")
    assert s2 == s and meta == {"classes": ["a", "b", "c"]}
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        a, b = model(x)[0], loaded.eval()(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    (tmp_path / "det" / "detector.json").write_text(
        '{"arch": "faster_rcnn", "spec": {"backbone": "vgg", "num_classes": 3}}'
    )
    with pytest.raises(ValueError, match="detector.json: backbone must be one of"):
        load_detector(tmp_path / "det")


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"backbone": "vgg"}, "backbone"),
        ({"norm": "ln"}, "norm"),
        ({"anchor_sizes": (8, 16)}, "anchor_sizes"),
        ({"backbone": "vit"}, "ViTSpec"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_spec_errors_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        spec(**kw)
