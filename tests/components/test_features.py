"""Layer capture for CKA: layer selection, pooling, and every model seeing the same images."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from components.analysis.cka import MinibatchCKA
from components.analysis.features import LayerCapture, paired_features, pattern_regex, pool_features, select_layers
from components.models.vit import ViTSpec, create_vit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit(ViTSpec.from_preset("vit_micro_patch4_32", depth=3)).eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


def test_default_layers_are_vit_blocks_and_resnet_residual_blocks(vit, cnn):
    assert select_layers(vit) == ["blocks.0", "blocks.1", "blocks.2"]
    assert select_layers(cnn) == [f"layer{k}.{m}" for k in range(1, 5) for m in range(2)]


def test_patterns_match_one_name_part_per_star(vit):
    assert pattern_regex("blocks.*").fullmatch("blocks.1")
    assert not pattern_regex("blocks.*").fullmatch("blocks.1.attn")
    assert pattern_regex("blocks.**").fullmatch("blocks.1.attn.qkv")
    assert select_layers(vit, ["blocks.*.mlp", "norm"]) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp", "norm"]
    assert select_layers(vit, ["blocks.2", "blocks.0"]) == ["blocks.0", "blocks.2"]  # model order, no repeats


def test_a_pattern_matching_nothing_lists_the_available_names(vit, cnn):
    with pytest.raises(
        ValueError, match=r"'layer\*\.\*' matches no module of VisionTransformer; available: .*blocks\.0.*norm"
    ):
        select_layers(vit, ["layer*.*"])
    with pytest.raises(ValueError, match=r"'blocks\.7' matches no module of ResNet; available: .*layer1\.0"):
        select_layers(cnn, ["blocks.7"])
    with pytest.raises(ValueError, match="unknown layers"):
        LayerCapture(vit, ["blocks.9"])


def test_vit_pooling_modes(vit):
    x = torch.randn(5, 3, 32, 32)
    tokens = vit.forward_features(x)  # [5, 1 + 64, 96]
    for pooling, shape in (("mean", (5, 96)), ("cls", (5, 96)), ("flatten", (5, 65 * 96))):
        with LayerCapture(vit, ["blocks.0", "norm"], pooling) as cap:
            feats = cap(x)
        assert list(feats) == ["blocks.0", "norm"]
        assert feats["blocks.0"].shape == shape
    with LayerCapture(vit, ["norm"], "flatten") as cap:
        assert torch.allclose(cap(x)["norm"], tokens.reshape(5, -1))
    with LayerCapture(vit, ["norm"], "mean") as cap:
        assert torch.allclose(cap(x)["norm"], tokens[:, 1:].mean(1), atol=1e-6)  # patch tokens, not [CLS]
    with LayerCapture(vit, ["norm"], "cls") as cap:
        assert torch.allclose(cap(x)["norm"], tokens[:, 0])
    assert not vit.norm._forward_hooks  # hooks removed on exit


def test_resnet_blocks_are_pooled_or_flattened(cnn):
    x = torch.randn(4, 3, 32, 32)
    with LayerCapture(cnn, ["layer1.0", "layer4.1"], "mean") as cap:
        feats = cap(x)
    assert feats["layer1.0"].shape == (4, 64) and feats["layer4.1"].shape == (4, 512)
    maps = cnn.layer1(cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(x)))))  # [4, 64, 8, 8]
    assert torch.allclose(pool_features(maps, "flatten"), maps.reshape(4, -1))
    with LayerCapture(cnn, ["layer1.1"], "flatten") as cap:
        assert torch.allclose(cap(x)["layer1.1"], maps.reshape(4, -1), atol=1e-6)


def test_one_pass_feeds_every_model_the_same_shuffled_batches(vit, cnn):
    """Even with a shuffling loader, a model compared with itself under two names gives CKA 1 on every
    corresponding layer: both copies saw the same images in the same order."""
    images = torch.randn(24, 3, 32, 32)
    loader = DataLoader(
        TensorDataset(images, torch.zeros(24)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    models = {"a": vit, "b": vit, "cnn": cnn}
    layers = {"a": select_layers(vit), "b": select_layers(vit), "cnn": ["layer1.0", "layer2.0"]}
    names = [f"{m}/{n}" for m in models for n in layers[m]]
    acc = MinibatchCKA(names, debiased=True)
    seen = 0
    for feats in paired_features(models, layers, loader, pooling="mean"):
        assert list(feats) == names
        assert {f.shape[0] for f in feats.values()} == {8}
        acc.update(feats)
        seen += 1
    assert seen == 3 and acc.num_examples == 24
    m = acc.compute()
    for i in range(3):
        assert m[i, 3 + i].item() == pytest.approx(1.0, abs=1e-9)
    assert not any(mod._forward_hooks for mod in vit.modules())
    assert not any(mod._forward_hooks for mod in cnn.modules())


def test_each_model_gets_its_own_input_transform(vit):
    images = torch.rand(6, 3, 32, 32)
    models, layers = {"raw": vit, "normalised": vit}, {"raw": ["norm"], "normalised": ["norm"]}
    (feats,) = list(
        paired_features(models, layers, [images], pooling="cls", transforms={"normalised": lambda x: (x - 0.5) / 0.25})
    )
    assert torch.allclose(feats["raw/norm"], vit.forward_features(images)[:, 0], atol=1e-6)
    assert torch.allclose(feats["normalised/norm"], vit.forward_features((images - 0.5) / 0.25)[:, 0], atol=1e-6)
