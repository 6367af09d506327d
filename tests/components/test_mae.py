"""MAE (He et al. 2021) properties: masking, patch order, loss on masked patches only, norm_pix
targets, fixed sin-cos position embeddings, encoder on visible tokens only, overfitting, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from components.models.mae import MaskedAutoencoder, mae_flops_per_image, normalize_patches
from components.models.reconstruction import PANELS, plot_reconstructions, reconstruct
from components.models.vit import ViTSpec, create_vit, load_encoder, save_encoder
from pipelines.layout import write_figure

torch.set_num_threads(1)
SPEC = ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # L = 16 patches


def tiny_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(SPEC, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (196, 0.75), (49, 0.5), (10, 0.33), (64, 0.9)])
def test_random_masking_keeps_exactly_int_L_times_1_minus_r(length, ratio):
    torch.manual_seed(length)
    n, d = 3, 5
    x = (
        torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(n, length, d).clone()
    )  # token i holds value i
    kept, mask, ids_restore = MaskedAutoencoder.random_masking(x, ratio)
    k = int(length * (1 - ratio))
    assert kept.shape == (n, k, d)
    assert mask.shape == (n, length) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == length - k).all()
    for i in range(n):
        kept_ids = set(kept[i, :, 0].long().tolist())
        assert len(kept_ids) == k
        # the mask marks exactly the removed patches, in the original patch order
        assert kept_ids == set(torch.nonzero(mask[i] == 0).flatten().tolist())
        # ids_restore inverts the shuffle: unshuffling the shuffled sequence gives back 0..L-1
        order = torch.argsort(ids_restore[i])  # = ids_shuffle
        assert torch.equal(order[:k].sort().values, torch.tensor(sorted(kept_ids)))
        assert torch.equal(torch.gather(order.float(), 0, ids_restore[i]), torch.arange(length, dtype=torch.float32))
        assert torch.equal(torch.gather(x[i, :, 0][order], 0, ids_restore[i]), x[i, :, 0])


def test_masking_is_per_sample_and_follows_explicit_noise():
    n, length = 4, 16
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(1))
    x = torch.randn(n, length, 8)
    _, mask_a, _ = MaskedAutoencoder.random_masking(x, 0.75, noise)
    _, mask_b, _ = MaskedAutoencoder.random_masking(x, 0.75, noise.clone())
    assert torch.equal(mask_a, mask_b)
    # the kept patches are the 4 with the smallest noise
    smallest = torch.argsort(noise, dim=1)[:, :4]
    assert torch.equal((mask_a == 0).nonzero()[:, 1].view(n, 4).sort(1).values, smallest.sort(1).values)
    # different samples get different masks
    assert len({tuple(m.tolist()) for m in mask_a}) > 1
    with pytest.raises(ValueError, match="noise must have shape"):
        MaskedAutoencoder.random_masking(x, 0.75, noise[:, :3])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            MaskedAutoencoder.random_masking(x, bad)


def test_patchify_order_and_round_trip():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 16, 4 * 4 * 3)
    # patch (row 1, col 2) is the 4x4 block at rows 4..7, cols 8..11, pixels in (p, q, c) order
    block = imgs[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 1 * 4 + 2], block)
    assert torch.equal(mae.unpatchify(patches), imgs)
    with pytest.raises(ValueError, match="patches"):
        mae.patchify(torch.randn(1, 3, 15, 16))


def test_norm_pix_target_has_zero_mean_unit_variance_per_patch():
    mae = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 16, 16) * 5 + 2
    t = mae.target(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 16), atol=1e-4)  # unbiased var, as MAE
    # a constant patch maps to zeros, not NaN
    assert torch.equal(normalize_patches(torch.ones(1, 1, 48)), torch.zeros(1, 1, 48))
    assert torch.equal(tiny_mae(norm_pix_loss=False).target(imgs), mae.patchify(imgs))


def test_loss_ignores_predictions_on_visible_patches():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1  # 6 removed patches per image
    loss = mae.forward_loss(imgs, pred, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # only visible patches change
    assert torch.allclose(mae.forward_loss(imgs, changed, mask), loss)
    changed = pred.clone()
    changed[mask == 1] += 1.0
    assert not torch.allclose(mae.forward_loss(imgs, changed, mask), loss)
    # the value is the mean over removed patches of the per-patch MSE
    per_patch = ((pred - mae.target(imgs)) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask == 1].mean())


def closed_form_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[1 + G*G, D]: zero cls row; per patch (i, j): sin/cos(i * w_k) then sin/cos(j * w_k), w_k = 10000^(-4k/D)."""
    rows = [[0.0] * dim]
    quarter = dim // 4
    for i in range(grid):
        for j in range(grid):
            w = [10000 ** (-k / quarter) for k in range(quarter)]
            rows.append(
                [math.sin(i * a) for a in w]
                + [math.cos(i * a) for a in w]
                + [math.sin(j * a) for a in w]
                + [math.cos(j * a) for a in w]
            )
    return torch.tensor(rows)


def test_position_embeddings_are_fixed_sincos():
    mae = tiny_mae()
    assert torch.allclose(mae.encoder.pos_embed[0], closed_form_pos_embed(32, 4), atol=1e-6)
    assert torch.allclose(mae.decoder_pos_embed[0], closed_form_pos_embed(32, 4), atol=1e-6)
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    before = (mae.encoder.pos_embed.clone(), mae.decoder_pos_embed.clone())
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-2)
    loss, _, _ = mae(torch.randn(2, 3, 16, 16), 0.75)
    loss.backward()
    opt.step()
    assert torch.equal(mae.encoder.pos_embed, before[0]) and torch.equal(mae.decoder_pos_embed, before[1])


def test_mae_init():
    mae = MaskedAutoencoder(ViTSpec(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2), 64, 1, 2)
    # xavier_uniform on the patch-embed weight viewed as a Linear [D, p*p*C]
    bound = math.sqrt(6 / (64 + 48))
    w = mae.encoder.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < mae.mask_token.std() < 0.03 and 0.01 < mae.encoder.cls_token.std() < 0.03
    fc = mae.encoder.blocks[0].mlp.fc1
    assert fc.weight.abs().max() <= math.sqrt(6 / sum(fc.weight.shape)) and torch.equal(
        fc.bias, torch.zeros_like(fc.bias)
    )


def test_encoder_sees_only_visible_patches():
    mae = tiny_mae().eval()
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    latent, mask, _ = mae.forward_encoder(imgs, 0.75, noise)
    assert seen[0] == (2, 1 + 4, 32) and latent.shape == (2, 5, 32)
    # rewriting the pixels of removed patches leaves the encoder's output unchanged
    patches = mae.patchify(imgs)
    altered = mae.unpatchify(torch.where(mask.unsqueeze(-1) > 0, torch.randn_like(patches), patches))
    assert torch.allclose(mae.forward_encoder(altered, 0.75, noise)[0], latent, atol=1e-6)
    assert not torch.allclose(mae.forward_encoder(imgs + 1, 0.75, noise)[0], latent)


def test_forward_shapes_and_encoder_round_trip(tmp_path):
    mae = tiny_mae()
    loss, pred, mask = mae(torch.randn(3, 3, 16, 16), 0.75)
    assert pred.shape == (3, 16, 48) and mask.shape == (3, 16) and loss.ndim == 0 and torch.isfinite(loss)
    save_encoder(mae.encoder, SPEC, tmp_path, source="pretrain_mae")
    vit, spec = load_encoder(tmp_path)
    assert spec == SPEC
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit.forward_features(x), mae.encoder.eval().forward_features(x), atol=1e-6)
    assert set(vit.state_dict()) == set(create_vit(SPEC).state_dict())


def test_overfits_one_tiny_batch():
    """With a fixed batch and fixed masks, the loss must fall by at least 90 %."""
    mae = tiny_mae()
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 16, 16)
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=5e-3, betas=(0.9, 0.95))
    first = None
    for _ in range(200):
        loss, _, _ = mae(imgs, 0.75, noise)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_flops_match_torch_counter():
    mae = tiny_mae()
    for m in mae.modules():  # explicit QK^T and AV matmuls: the counter has no rule for CPU fused attention
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    imgs = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        mae(imgs, 0.75)
    # the counter counts matmuls, convolutions and attention; the loss is elementwise and free here
    assert counter.get_total_flops() == pytest.approx(2 * mae_flops_per_image(SPEC, 32, 1, 0.75), rel=1e-9)


def test_reconstruction_panels_and_figure(tmp_path):
    mae = tiny_mae(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    panels = reconstruct(mae, imgs, 0.75, noise)
    assert mae.training  # restored
    keep = (1 - panels["mask"]).unsqueeze(-1)
    # visible patches of the pasted panel are the original pixels; masked ones are the prediction
    assert torch.allclose(mae.patchify(panels["reconstruction + visible"]) * keep, mae.patchify(imgs) * keep)
    assert torch.allclose(mae.patchify(panels["masked"]), mae.patchify(imgs) * keep)
    # with norm_pix the displayed prediction is un-normalised with the original patch statistics:
    # re-normalising it gives back the raw prediction
    _, pred, _ = mae.eval()(imgs, 0.75, noise)
    shown = mae.patchify(panels["reconstruction"])
    mean, var = mae.patchify(imgs).mean(-1, keepdim=True), mae.patchify(imgs).var(-1, keepdim=True)
    assert torch.allclose((shown - mean) / (var + 1e-6) ** 0.5, pred, atol=1e-5)
    fig = plot_reconstructions(panels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), title="t")
    assert len(fig.axes) == 2 * len(PANELS)
    path = write_figure(fig, tmp_path / "rec.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_decay_spares_norms_and_biases_and_the_frozen_position_embeddings_are_not_optimised():
    """``main_pretrain.py`` decays every tensor but biases and 1-D ones (timm's ``add_weight_decay``
    without a skip list): the [CLS] and mask tokens are decayed."""
    from components.training.optim import param_groups

    mae = tiny_mae()
    groups = param_groups(mae, 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias", "decoder_norm.bias", "decoder_pred.bias"} <= exempt
    assert {
        "mask_token",
        "encoder.cls_token",
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "decoder_pred.weight",
    } <= decayed
    assert all(mae.get_parameter(n).ndim <= 1 for n in exempt)
    assert all(mae.get_parameter(n).ndim >= 2 for n in decayed)
    assert "encoder.pos_embed" not in decayed | exempt and "decoder_pos_embed" not in decayed | exempt  # frozen


def test_position_embedding_is_fixed_sincos_for_mae_trainable_for_finetuning_and_learned_for_ibot():
    from components.models.vit import sincos_2d

    table = sincos_2d(SPEC.embed_dim, SPEC.grid_size, cls_token=True)
    fixed, trainable, learned = (
        create_vit(SPEC, pos_embed=kind).pos_embed for kind in ("sincos_fixed", "sincos", "learned")
    )
    assert torch.equal(fixed, table) and not fixed.requires_grad
    assert torch.equal(trainable, table) and trainable.requires_grad
    assert learned.requires_grad and 0.015 < float(learned.detach().std()) < 0.025  # truncated normal, std 0.02
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        create_vit(SPEC, pos_embed="rope")
