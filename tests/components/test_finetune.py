"""Fine-tuning parts: layer-wise lr decay, pretrained init, classifier I/O, the CNN baseline, the mixing step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from components.io import load_safetensors, save_safetensors
from components.models.classifier import (
    ClassifierLoadError,
    build_cnn_classifier,
    build_vit_classifier,
    cnn_meta,
    load_classifier,
    save_classifier,
    vit_meta,
)
from components.models.cnn import create_cnn, residual_blocks
from components.models.vit import EncoderLoadError, ViTSpec, create_vit, encoder_state, save_encoder
from components.training.distributed import EpochLoader
from components.training.engine import TrainConfig, Trainer
from components.training.finetune import (
    FinetuneStep,
    build_mixup,
    finetune_criterion,
    finetune_optimizer,
    finetune_transforms,
)

torch.set_num_threads(1)
SPEC = ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


def pretrained_dir(tmp_path, spec=SPEC, seed=0):
    torch.manual_seed(seed)
    enc = create_vit(spec)
    for p in enc.parameters():  # make every tensor distinctive, not just the default init
        p.data.add_(0.01 * torch.randn_like(p))
    save_encoder(enc, spec, tmp_path / "enc")
    return tmp_path / "enc", encoder_state(enc)


def test_layer_decay_gives_each_block_its_lr(tmp_path):
    """BEiT/MAE: lr(block b) = lr * decay ** (depth - b); embeddings decay ** (depth + 1); head lr."""
    torch.manual_seed(0)
    model, _ = build_vit_classifier(4, spec=SPEC, drop_path_rate=0.0)
    decay, base = 0.5, 1e-3
    opt = finetune_optimizer(model, weight_decay=0.05, layer_decay=decay, depth=SPEC.depth)
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))
    trainer = Trainer(
        model, opt, TrainConfig(total_steps=1, batch_size=4, progress=False), torch.device("cpu"), lr_fn=lambda s: base
    )
    trainer.fit(EpochLoader(data, 4, seed=0), FinetuneStep(finetune_criterion(None, 0.1)))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for b in range(SPEC.depth):
        expected = base * decay ** (SPEC.depth - b)
        for name in ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc2.weight", "norm1.weight"):
            assert lr_of[id(named[f"blocks.{b}.{name}"])] == pytest.approx(expected)
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        assert lr_of[id(named[name])] == pytest.approx(base * decay ** (SPEC.depth + 1))
    for name in ("head.weight", "head.bias", "fc_norm.weight"):
        assert lr_of[id(named[name])] == pytest.approx(base)
    # weight decay only on matrices, never on biases, norms or tokens
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    assert (
        wd_of[id(named["blocks.0.attn.qkv.bias"])]
        == wd_of[id(named["pos_embed"])]
        == wd_of[id(named["cls_token"])]
        == 0.0
    )


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_pretrained_init_restores_encoder_and_starts_a_fresh_head(tmp_path, pool):
    enc_dir, saved = pretrained_dir(tmp_path)
    model, spec = build_vit_classifier(5, encoder_dir=enc_dir, global_pool=pool)
    assert spec == SPEC
    state = model.state_dict()
    for k, v in saved.items():
        if pool == "avg" and k.startswith("norm."):  # MAE drops the final norm when pooling with fc_norm
            assert k not in state
            continue
        assert torch.equal(state[k], v), k
    assert model.head.weight.shape == (5, SPEC.embed_dim)
    assert model.head.weight.abs().max() < 1e-4 and model.head.weight.std() > 0  # trunc_normal(std 2e-5)
    assert torch.count_nonzero(model.head.bias) == 0
    if pool == "avg":
        assert (
            torch.equal(model.fc_norm.weight, torch.ones(SPEC.embed_dim))
            and torch.count_nonzero(model.fc_norm.bias) == 0
        )
    # the pretrained encoder decides the prediction only through the fresh head: near-uniform logits
    assert model(torch.randn(2, 3, 16, 16)).abs().max() < 1e-2


def test_encoder_that_does_not_match_its_architecture_names_the_tensors(tmp_path):
    enc_dir, saved = pretrained_dir(tmp_path)
    broken = {k: v for k, v in saved.items() if not k.startswith("blocks.2.")}
    broken["blocks.0.mlp.fc1.weight"] = torch.zeros(7, SPEC.embed_dim)
    save_safetensors(enc_dir / "encoder.safetensors", broken)
    with pytest.raises(EncoderLoadError) as err:
        build_vit_classifier(5, encoder_dir=enc_dir)
    msg = str(err.value)
    assert "encoder.safetensors" in msg and "blocks.0.mlp.fc1.weight (7, 32) vs (128, 32)" in msg and "blocks.2." in msg


def test_classifier_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    vit, spec = build_vit_classifier(3, spec=SPEC, global_pool="token")
    with torch.no_grad():
        vit.head.weight.normal_()
    save_classifier(vit, tmp_path / "vit", vit_meta(spec, 3, "token", ["a", "b", "c"]))
    cnn = build_cnn_classifier("resnet10", 3, img_size=16, width=8)
    save_classifier(cnn, tmp_path / "cnn", cnn_meta("resnet10", 3, 16, 8, ["a", "b", "c"]))
    x = torch.randn(2, 3, 16, 16)
    for model, d in ((vit.eval(), "vit"), (cnn.eval(), "cnn")):
        loaded = load_classifier(tmp_path / d)
        assert not loaded.training
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    # weights of another width: a one-line error naming the tensors and the file
    other = build_cnn_classifier("resnet10", 3, img_size=16, width=4)
    save_safetensors(tmp_path / "cnn" / "model.safetensors", other.state_dict())
    with pytest.raises(
        ClassifierLoadError,
        match=r"model\.safetensors.*shape mismatch: .*conv1\.weight \(4, 3, 3, 3\) vs \(8, 3, 3, 3\)",
    ):
        load_classifier(tmp_path / "cnn")
    state = load_safetensors(tmp_path / "vit" / "model.safetensors")
    state.pop("blocks.1.attn.proj.bias")
    save_safetensors(tmp_path / "vit" / "model.safetensors", state)
    with pytest.raises(ClassifierLoadError, match=r"missing: blocks\.1\.attn\.proj\.bias"):
        load_classifier(tmp_path / "vit")


def test_cnn_small_stem_keeps_resolution_and_exposes_blocks():
    """CIFAR stem (He et al. 2016, Sec. 4.2): layer1 runs at full resolution on small images."""
    small = create_cnn("resnet18", num_classes=4, img_size=32, width=8)
    big = create_cnn("resnet18", num_classes=4, img_size=224, width=8)
    shapes = {}
    blocks = residual_blocks(small)
    assert [n for n, _ in blocks] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape)) for n, m in blocks]
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    for h in hooks:
        h.remove()
    assert shapes["layer1.0"] == (2, 8, 32, 32) and shapes["layer4.1"] == (2, 64, 4, 4)
    assert (
        big.conv1.stride == (2, 2)
        and small.conv1.kernel_size == (3, 3)
        and isinstance(small.maxpool, torch.nn.Identity)
    )
    # the last BN of every residual branch starts at zero: each block starts as the identity
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for _, b in blocks)


class Recorder(torch.nn.Module):
    """A linear classifier that remembers the (mixed) images it was given."""

    def __init__(self, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 16 * 16, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.fc(x.flatten(1))


def test_finetune_step_mixes_reproducibly_without_touching_numpy_state():
    model = Recorder(4)
    mix = build_mixup(4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    step = FinetuneStep(finetune_criterion(mix, 0.1), mix, seed=3)
    batch = (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    fresh = lambda: (batch[0].clone(), batch[1].clone())  # noqa: E731  (timm mixes in place)
    loss_a, _ = step(model, fresh(), 5)
    loss_b, _ = FinetuneStep(finetune_criterion(mix, 0.1), mix, seed=3)(model, fresh(), 5)  # e.g. after a resume
    loss_c, _ = step(model, fresh(), 6)
    FinetuneStep(finetune_criterion(mix, 0.1), mix, seed=3, rank=1)(model, fresh(), 5)  # another DDP rank
    a, b, c, other_rank = model.seen
    assert torch.equal(a, b) and torch.equal(loss_a, loss_b)
    assert not torch.equal(a, c) and not torch.equal(a, batch[0])  # another step mixes differently
    assert not torch.equal(a, other_rank)  # and so does another rank at the same step
    assert np.array_equal(np.random.get_state()[1], before)
    # a mixed batch is a convex combination of the batch and its reverse (Mixup) or a pasted box (CutMix)
    x, flipped = batch[0], batch[0].flip(0)
    for mixed in (a, c):
        lam = ((mixed - flipped) / (x - flipped)).median()
        assert torch.allclose(mixed, lam * x + (1 - lam) * flipped, atol=1e-5) or bool(
            ((mixed == x) | (mixed == flipped)).all()
        )


def test_train_transform_survives_the_strongest_rand_augment():
    """At magnitude 10 timm's posterize asks for 0 bits, which Pillow >= 10 refuses; the cap avoids it."""
    from PIL import Image

    train, evaluation = finetune_transforms(16, "rand-m10-mstd0.5-inc1-n15-p1.0", re_prob=1.0)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    np.random.seed(0)
    outs = [train(img) for _ in range(20)]
    assert all(o.shape == (3, 16, 16) and torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(evaluation(img), evaluation(img))  # evaluation is deterministic


def test_evaluation_view_is_the_centre_crop_of_the_resized_image():
    """MAE's build_transform at 224 px: Resize(256) + CenterCrop(224) (crop_pct 0.875); crop_pct 1 keeps
    the whole image. A frame 16 px wide around a 256-px image is inside the view at 1, cut at 0.875."""
    from PIL import Image

    img = np.full((256, 256, 3), 255, dtype=np.uint8)
    img[16:-16, 16:-16] = 0  # black centre, white frame
    mean, std = (0.0,) * 3, (1.0,) * 3
    whole = finetune_transforms(224, mean=mean, std=std)[1](Image.fromarray(img))
    centre = finetune_transforms(224, mean=mean, std=std, eval_crop_pct=0.875)[1](Image.fromarray(img))
    assert whole.shape == centre.shape == (3, 224, 224)
    assert (
        float(whole[:, :5].mean()) > 0.9 and float(centre.max()) < 0.05
    )  # Resize(256) then the centre 224: no frame left
