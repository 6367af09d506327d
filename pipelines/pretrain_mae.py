"""Stage ``pretrain_mae``: Masked Autoencoder pretraining (He et al. 2021) on the unlabeled train images.

The recipe of the paper (``main_pretrain.py``): RandomResizedCrop(scale 0.2-1, bicubic) + flip; AdamW
betas (0.9, 0.95), weight decay 0.05 with norms and biases exempt (the cls and mask tokens are
decayed, the position embeddings are fixed); lr = blr x effective_batch / 256, linear warmup then
half-cosine, set per iteration; gradient accumulation up to ``effective_batch``. Inputs are normalised
with ``mean``/``std`` (ImageNet's by default, recorded in encoder.json for the stages that load the
encoder).

Writes ``models/pretrain_mae/encoder.{safetensors,json}`` (the shared encoder format) and
``mae.{safetensors,json}`` (encoder + decoder, for reconstructions), ``metrics/pretrain_mae.json``,
``plots/pretrain_mae/loss.csv`` and ``plots/pretrain_mae/reconstructions.png`` on held-out images.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
from torchvision import transforms as T

from components.data.sources import ImageListDataset
from components.io import save_safetensors, write_json, write_text
from components.models.mae import MaskedAutoencoder
from components.models.reconstruction import plot_reconstructions, reconstruct
from components.models.vit import save_encoder
from components.training.distributed import EpochLoader
from components.training.engine import TrainConfig, Trainer
from components.training.optim import adamw, param_groups
from components.training.schedules import stretch_epochs, warmup_cosine
from pipelines import layout
from pipelines.common import StageContext, classification_index, run_stage
from pipelines.config import ParamsError, PretrainMAE

log = logging.getLogger("mimflow.pretrain_mae")


def train_transform(cfg: PretrainMAE, img_size: int) -> T.Compose:
    """MAE's pretraining augmentation (``main_pretrain.py``): RandomResizedCrop, then a horizontal flip
    with probability ``hflip`` (left out at 0)."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=cfg.crop_scale, interpolation=T.InterpolationMode.BICUBIC),
            *([T.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def eval_transform(cfg: PretrainMAE, img_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


class WithMaskingNoise(torch.utils.data.Dataset):
    """(image, label) -> (image, masking noise [L]): each sample's ``random_masking`` noise is drawn with
    its augmentation, from the loader's per-sample seed, so masks are independent across samples and
    processes and the same for any number of processes, workers or resumes."""

    def __init__(self, dataset, num_patches: int):
        self.dataset, self.num_patches = dataset, num_patches

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, _ = self.dataset[i]
        return img, torch.rand(self.num_patches)


def accumulation_steps(cfg: PretrainMAE, world_size: int) -> int:
    """Micro-batches per optimizer step so that batch_size x accum x processes = effective_batch."""
    per_step = cfg.batch_size * world_size
    if cfg.effective_batch is None:
        return 1
    if cfg.effective_batch % per_step:
        raise ParamsError(
            f"pretrain_mae.effective_batch = {cfg.effective_batch}: must be a multiple of batch_size x processes "
            f"({cfg.batch_size} x {world_size})"
        )
    return cfg.effective_batch // per_step


@torch.no_grad()
def held_out_loss(mae: MaskedAutoencoder, dataset, cfg: PretrainMAE, ctx: StageContext, autocast) -> float:
    """Mean masked-patch loss on held-out images, with masks drawn from a generator fixed by the seed."""
    mae.eval()
    gen = torch.Generator().manual_seed(ctx.seed)
    length = mae.spec.num_patches
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=ctx.num_workers)
    for imgs, _ in loader:
        noise = torch.rand(imgs.shape[0], length, generator=gen).to(ctx.device)
        with autocast:
            loss, _, _ = mae(imgs.to(ctx.device), cfg.mask_ratio, noise)
        total += float(loss) * imgs.shape[0]  # every image has the same number of masked patches
        count += imgs.shape[0]
    return total / count


@dataclass
class Data:
    train_set: WithMaskingNoise  # the unlabeled train images (labels ignored) with each sample's masking noise
    val_set: ImageListDataset  # held-out images for the masked-patch loss and the figure
    loader: EpochLoader
    accum: int  # micro-batches per optimizer step


@dataclass
class Plan:
    """The schedule's lengths and the peak lr (lr = blr x effective batch / 256)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eff_batch: int
    lr: float


def load_data(ctx: StageContext, cfg: PretrainMAE, img_size: int, num_patches: int) -> Data:
    index = classification_index(ctx)
    train_set = WithMaskingNoise(ImageListDataset(index.train, train_transform(cfg, img_size)), num_patches)
    stride = max(1, len(index.val) // cfg.val_images) if cfg.val_images else 1
    val_items = index.val[::stride][: cfg.val_images]  # spread over the (class-sorted) val list
    val_set = ImageListDataset(val_items, eval_transform(cfg, img_size))
    accum = accumulation_steps(cfg, ctx.info.world_size)
    loader = EpochLoader(
        train_set, cfg.batch_size, ctx.seed, ctx.info, ctx.num_workers, pin_memory=ctx.device.type == "cuda"
    )
    return Data(train_set, val_set, loader, accum)


def plan(ctx: StageContext, cfg: PretrainMAE, data: Data) -> Plan:
    eff_batch = cfg.batch_size * data.accum * ctx.info.world_size
    steps_per_epoch = len(data.loader) // data.accum
    if steps_per_epoch == 0:
        raise ParamsError(
            f"pretrain_mae.effective_batch = {eff_batch}: larger than the {len(data.train_set)} training images"
        )
    epochs, warmup_epochs = stretch_epochs(cfg.epochs, cfg.warmup_epochs, steps_per_epoch, cfg.min_steps)
    return Plan(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        eff_batch=eff_batch,
        lr=cfg.blr * eff_batch / 256,
    )


def build_trainer(ctx: StageContext, cfg: PretrainMAE, mae: MaskedAutoencoder, data: Data, p: Plan) -> Trainer:
    """AdamW (betas 0.9, 0.95; norms and biases exempt), lr warm-up then cosine to min_lr (MAE Sec. A.1)."""
    optimizer = adamw(param_groups(mae, cfg.weight_decay), lr=p.lr, betas=cfg.betas, device=ctx.device)
    log.info(
        "%s (%d train images, %d held-out), %d epochs x %d steps, effective batch %d (%d x %d accum x %d procs), lr "
        "%.3g",
        mae.spec,
        len(data.train_set),
        len(data.val_set),
        p.epochs,
        p.steps_per_epoch,
        p.eff_batch,
        cfg.batch_size,
        data.accum,
        ctx.info.world_size,
        p.lr,
    )
    runtime = ctx.params.runtime
    return Trainer(
        mae,
        optimizer,
        TrainConfig(
            total_steps=p.total_steps,
            batch_size=cfg.batch_size,
            accum_steps=data.accum,
            clip_grad=cfg.clip_grad,
            precision=ctx.precision,
            ckpt_dir=ctx.checkpoint_dir,
            ckpt_every=cfg.ckpt_every,
            log_every=cfg.log_every,
            fingerprint=ctx.fingerprint(data.accum, ctx.root / layout.CLASSIFICATION),
            desc="pretrain_mae",
            progress=runtime.progress,
            compile=runtime.compile,
        ),
        ctx.device,
        ctx.info,
        lr_fn=lambda step: warmup_cosine(step, p.total_steps, p.warmup_steps, p.lr, cfg.min_lr),
        on_log=lambda step, record: ctx.log_metrics({k: v for k, v in record.items() if k != "step"}, step),
    )


def write_outputs(
    ctx: StageContext, cfg: PretrainMAE, mae: MaskedAutoencoder, data: Data, p: Plan, trainer: Trainer
) -> dict:
    """The held-out masked-patch loss, the encoder (+ the whole MAE), the loss curve, the reconstructions
    figure; the metrics."""
    spec, val_set, history = mae.spec, data.val_set, trainer.history
    mae.eval()
    val_loss = held_out_loss(mae, val_set, cfg, ctx, trainer.autocast())
    out = ctx.models_dir
    meta = {"source": "pretrain_mae", "mean": list(cfg.mean), "std": list(cfg.std)}
    save_encoder(mae.encoder, spec, out, **meta)
    save_safetensors(out / "mae.safetensors", mae.state_dict())
    write_json(
        out / "mae.json",
        {
            "arch": "mae",
            "encoder": spec.to_dict(),
            "decoder_embed_dim": cfg.decoder_embed_dim,
            "decoder_depth": cfg.decoder_depth,
            "decoder_num_heads": cfg.decoder_num_heads,
            "norm_pix_loss": cfg.norm_pix_loss,
            "mask_ratio": cfg.mask_ratio,
            **meta,
        },
    )
    ctx.tracker.log_artifact(out / "encoder.json", "encoder")

    curve = [r for r in history if "loss" in r]
    ctx.plots_dir.mkdir(parents=True, exist_ok=True)
    write_text(
        ctx.plots_dir / "loss.csv",
        "step,loss,lr\n" + "".join(f"{r['step']},{r['loss']:.6f},{r['lr']:.6g}\n" for r in curve),
    )
    ctx.tracker.log_artifact(ctx.plots_dir / "loss.csv", "plots")

    picks = (
        torch.linspace(0, len(val_set) - 1, min(cfg.figure_images, len(val_set))).round().long().tolist()
    )  # spread over classes
    figure_imgs = torch.stack([val_set[i][0] for i in picks])
    noise = torch.rand(figure_imgs.shape[0], spec.num_patches, generator=torch.Generator().manual_seed(ctx.seed))
    panels = reconstruct(mae.float().cpu(), figure_imgs, cfg.mask_ratio, noise)
    title = f"MAE on held-out images: mask ratio {cfg.mask_ratio:g}, masked-patch loss {float(panels['loss']):.3f}"
    figure = plot_reconstructions(panels, cfg.mean, cfg.std, title)
    layout.write_figure(figure, ctx.plots_dir / "reconstructions.png", ctx)
    ctx.log_encoder(mae.encoder, figure_imgs)

    speeds = [r["images_per_s"] for r in curve if trainer.resumed_from is None or r["step"] > trainer.resumed_from]
    return {
        "train_loss": round(curve[-1]["loss"], 5),
        "train_loss_first": round(curve[0]["loss"], 5),
        "val_masked_loss": round(val_loss, 5),
        "images_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "steps": p.total_steps,
        "epochs": p.epochs,
        "effective_batch": p.eff_batch,
        "peak_lr": p.lr,  # after warm-up; the per-step "lr" series is the schedule
        "encoder_params_m": round(sum(p_.numel() for p_ in mae.encoder.parameters()) / 1e6, 3),
        "resumed_from_step": trainer.resumed_from,
    }


def pretrain_mae(ctx: StageContext) -> dict:
    """Pretrain a ViT encoder as a Masked Autoencoder and save it in the shared encoder format."""
    cfg: PretrainMAE = ctx.section
    spec = cfg.model.spec()
    # ---- data: augmented unlabeled images with their masking noise; held-out images
    data = load_data(ctx, cfg, spec.img_size, spec.num_patches)
    p = plan(ctx, cfg, data)
    # ---- model: the ViT encoder and the lightweight decoder (Sec. 3)
    mae = MaskedAutoencoder(
        spec,
        cfg.decoder_embed_dim,
        cfg.decoder_depth,
        cfg.decoder_num_heads,
        norm_pix_loss=cfg.norm_pix_loss,
        mask_ratio=cfg.mask_ratio,
    )
    # ---- optimisation: the loss on the masked patches of each sample's own random mask
    trainer = build_trainer(ctx, cfg, mae, data, p)

    def step_fn(model, batch, step):
        imgs, noise = batch  # [B, C, H, W], [B, L]
        loss, _, _ = model(imgs, cfg.mask_ratio, noise)
        return loss, {}

    trainer.fit(data.loader, step_fn)
    if not ctx.is_main:
        return {}
    # ---- outputs
    return write_outputs(ctx, cfg, mae, data, p, trainer)


if __name__ == "__main__":
    run_stage("pretrain_mae", pretrain_mae)
