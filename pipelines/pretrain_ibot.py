"""Stage ``pretrain_ibot``: iBOT pretraining (Zhou et al. 2021) on the unlabeled train images.

The recipe of ``main_ibot.py``: two global crops (the encoder's image size) and ``num_local`` local
crops with DINO's augmentations; block-wise masks on the global crops; the student (drop path) sees
the masked global crops and the local crops, the EMA teacher only the unmasked global crops; loss =
[CLS] self-distillation over cross-view pairs + MIM distillation over same-view pairs; AdamW with
lr = blr x batch / 256, linear warmup then cosine to ``min_lr``, weight decay cosine
``weight_decay`` -> ``weight_decay_end``, per-parameter gradient clipping, the head's last layer frozen
for ``freeze_last_layer_epochs``, teacher momentum cosine to 1 (lr, weight decay and momentum per
iteration as ``utils.cosine_scheduler``), teacher temperature warm-up, and the centres all-reduced
across processes.

Writes the *teacher's* encoder (the one the paper evaluates) as ``models/pretrain_ibot/encoder.*``,
``metrics/pretrain_ibot.json`` (losses, the teacher's weighted k-NN accuracy on the labeled split ->
val, collapse diagnostics, images/s), ``plots/pretrain_ibot/loss.csv`` and
``plots/pretrain_ibot/attention.png`` (the teacher's [CLS] attention in the last block on held-out images).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
from timm.data import create_transform

from components.data.masking import BlockMaskGenerator
from components.data.multicrop import MaskedMultiCropDataset, MultiCropAugmentation
from components.data.sources import ClassificationIndex, ImageListDataset
from components.data.splits import read_labeled_indices
from components.evaluation.knn import extract_features, knn_accuracy
from components.io import write_text
from components.models.attention import attention_figure, cls_attention_maps
from components.models.ibot import IBOTLoss, IBOTViT, create_ibot_pair
from components.models.vit import save_encoder
from components.training.distributed import EpochLoader
from components.training.engine import TrainConfig, Trainer
from components.training.ibot import IBOTTraining
from components.training.optim import adamw, param_groups
from components.training.schedules import cosine, cosine_scheduler, stretch_epochs
from pipelines import layout
from pipelines.common import StageContext, classification_index, run_stage
from pipelines.config import ParamsError, PretrainIBOT

log = logging.getLogger("mimflow.pretrain_ibot")
CURVE_COLUMNS = ("loss", "loss_cls", "loss_mim", "lr", "teacher_entropy", "teacher_kl", "teacher_temp")


def multicrop_augmentation(cfg: PretrainIBOT, img_size: int) -> MultiCropAugmentation:
    """The multi-crop views of ``pretrain_ibot.multicrop`` (iBOT Sec. 3.2, DINO's augmentations)."""
    mc = cfg.multicrop
    return MultiCropAugmentation(
        img_size,
        mc.local_size,
        mc.num_local,
        mc.global_scale,
        mc.local_scale,
        mc.blur_sigma,
        color_jitter=mc.color_jitter,
        color_jitter_p=mc.color_jitter_p,
        grayscale_p=mc.grayscale_p,
        mean=cfg.mean,
        std=cfg.std,
        hflip=mc.hflip,
        blur_p=mc.blur_p,
        solarize_p=mc.solarize_p,
    )


def eval_transform(cfg: PretrainIBOT, img_size: int):
    """k-NN and attention views: bicubic Resize(img_size / knn.crop_pct), CenterCrop(img_size), normalised."""
    return create_transform(
        img_size, is_training=False, crop_pct=cfg.knn.crop_pct, interpolation="bicubic", mean=cfg.mean, std=cfg.std
    )


def train_items(cfg: PretrainIBOT, items: list, seed: int) -> list:
    """All train images, or a fixed random subset of ``train_images`` of them (labels are ignored)."""
    if cfg.train_images is None or cfg.train_images >= len(items):
        return items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(order[: cfg.train_images])]


def knn_top1(ctx: StageContext, teacher: IBOTViT, labeled: list, val: list, num_classes: int) -> float:
    """The teacher encoder's weighted k-NN top-1 (percent): labeled split as memory, val as queries."""
    cfg: PretrainIBOT = ctx.section
    tf = eval_transform(cfg, cfg.model.spec().img_size)

    def feats(items):
        loader = torch.utils.data.DataLoader(
            ImageListDataset(items, tf), batch_size=cfg.knn.batch_size, num_workers=ctx.num_workers
        )
        return extract_features(teacher.encoder, loader, ctx.device)

    with torch.random.fork_rng(devices=[]):  # evaluating never shifts the training's random stream
        train_f, train_l = feats(labeled)
        val_f, val_l = feats(val)
    return knn_accuracy(train_f, train_l, val_f, val_l, num_classes, k=cfg.knn.k, T=cfg.knn.temperature)


def write_curve(ctx: StageContext, history: list[dict]) -> None:
    rows = [r for r in history if "loss" in r]
    lines = ["step," + ",".join(CURVE_COLUMNS) + "\n"]
    lines += [f"{r['step']}," + ",".join(f"{r.get(c, float('nan')):.6g}" for c in CURVE_COLUMNS) + "\n" for r in rows]
    write_text(ctx.plots_dir / "loss.csv", "".join(lines))
    ctx.tracker.log_artifact(ctx.plots_dir / "loss.csv", "plots")


@dataclass
class Data:
    """What training and evaluation read: the index, the k-NN memory (labeled split), the multi-crop set."""

    index: ClassificationIndex
    labeled: list
    train_set: MaskedMultiCropDataset
    loader: EpochLoader


@dataclass
class Plan:
    """The schedule's lengths and the peak lr (lr = blr x batch / 256)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    batch: int
    lr: float


def load_data(ctx: StageContext, cfg: PretrainIBOT, img_size: int, patch_size: int) -> Data:
    """The unlabeled train images as masked multi-crop views (Sec. 3.2), and the labeled split for the k-NN."""
    index = classification_index(ctx)
    split = ctx.root / layout.existing_labeled_split(ctx, "pretrain_ibot.knn", cfg.knn.labeled_percent, cfg.knn.fold)
    labeled = [index.train[i] for i in read_labeled_indices(split, len(index.train))]
    augment = multicrop_augmentation(cfg, img_size)
    masking = BlockMaskGenerator(cfg.masking.prob, cfg.masking.ratio, cfg.masking.aspect, cfg.masking.min_block_area)
    train_set = MaskedMultiCropDataset(
        ImageListDataset(train_items(cfg, index.train, ctx.seed)), augment, masking, patch_size
    )
    if len(train_set) < cfg.batch_size * ctx.info.world_size:
        raise ParamsError(
            f"pretrain_ibot.batch_size = {cfg.batch_size}: larger than the {len(train_set)} training images per "
            f"{ctx.info.world_size} process(es)"
        )
    loader = EpochLoader(
        train_set, cfg.batch_size, ctx.seed, ctx.info, ctx.num_workers, pin_memory=ctx.device.type == "cuda"
    )
    return Data(index, labeled, train_set, loader)


def plan(ctx: StageContext, cfg: PretrainIBOT, steps_per_epoch: int) -> Plan:
    epochs, warmup_epochs = stretch_epochs(cfg.epochs, cfg.warmup_epochs, steps_per_epoch, cfg.min_steps)
    batch = cfg.batch_size * ctx.info.world_size
    return Plan(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        batch=batch,
        lr=cfg.blr * batch / 256,
    )


def build_trainer(
    ctx: StageContext, cfg: PretrainIBOT, student: IBOTViT, teacher: IBOTViT, p: Plan
) -> tuple[IBOTTraining, Trainer]:
    """The iBOT step (loss with its centres, temperatures, frozen last layer, EMA teacher) and the engine that
    runs it: AdamW, lr cosine after a linear warm-up, weight decay cosine, per-parameter clipping."""
    lc = cfg.loss
    loss = IBOTLoss(
        cfg.head.out_dim,
        cfg.head.patch_out_dim,
        2,
        cfg.multicrop.num_local,
        lc.student_temp,
        lc.center_momentum,
        lc.center_momentum2,
        lc.lambda1,
        lc.lambda2,
    ).to(ctx.device)
    ibot = IBOTTraining(
        student,
        teacher,
        loss,
        p.steps_per_epoch,
        p.total_steps,
        momentum=cfg.momentum_teacher,
        teacher_temp=(lc.warmup_teacher_temp, lc.teacher_temp),
        teacher_patch_temp=(lc.warmup_teacher_patch_temp, lc.teacher_patch_temp),
        warmup_teacher_temp_epochs=lc.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=cfg.freeze_last_layer_epochs,
        seed=ctx.seed,
        rank=ctx.info.rank,
    )
    optimizer = adamw(param_groups(student, cfg.weight_decay), lr=p.lr, betas=cfg.betas, device=ctx.device)
    runtime = ctx.params.runtime
    trainer = Trainer(
        student,
        optimizer,
        TrainConfig(
            total_steps=p.total_steps,
            batch_size=cfg.batch_size,
            clip_grad=cfg.clip_grad,
            clip_mode="per_param",
            precision=ctx.precision,
            ckpt_dir=ctx.checkpoint_dir,
            ckpt_every=cfg.ckpt_every,
            log_every=cfg.log_every,
            fingerprint=ctx.fingerprint(ctx.root / layout.CLASSIFICATION),
            desc="pretrain_ibot",
            progress=runtime.progress,
            compile=runtime.compile,
        ),
        ctx.device,
        ctx.info,
        lr_fn=lambda step: cosine_scheduler(step, p.total_steps, p.lr, cfg.min_lr, p.warmup_steps),
        wd_fn=lambda step: cosine(step, p.total_steps, cfg.weight_decay, cfg.weight_decay_end),
        grad_hook=ibot.grad_hook,
        after_step=ibot.after_step,
        extra_state=ibot.extra_state,
        on_log=lambda step, record: ctx.log_metrics(
            {k: v for k, v in record.items() if k not in ("step", "epoch")}, step
        ),
    )
    return ibot, trainer


def write_outputs(
    ctx: StageContext, cfg: PretrainIBOT, teacher: IBOTViT, data: Data, p: Plan, trainer: Trainer
) -> dict:
    """The teacher's encoder, its final k-NN top-1, the loss curve, the [CLS] attention figure; the metrics."""
    spec, index, history = cfg.model.spec(), data.index, trainer.history
    teacher.eval()
    out = ctx.models_dir
    save_encoder(teacher.encoder, spec, out, source="pretrain_ibot", mean=list(cfg.mean), std=list(cfg.std))
    ctx.tracker.log_artifact(out / "encoder.json", "encoder")
    knn = round(knn_top1(ctx, teacher, data.labeled, index.val, len(index.classes)), 3)
    ctx.log_metrics({"knn_top1": knn}, step=p.total_steps)  # the end of the k-NN curve
    log.info("teacher k-NN top-1 %.2f %% (chance %.2f %%)", knn, 100 / len(index.classes))

    ctx.plots_dir.mkdir(parents=True, exist_ok=True)
    write_curve(ctx, history)
    tf = eval_transform(cfg, spec.img_size)
    n = min(cfg.attention_images, len(index.val))
    step_ = max(1, len(index.val) // n)  # spread over the classes (val is grouped by class)
    images = torch.stack([tf(ImageListDataset(index.val)[i][0]) for i in range(0, step_ * n, step_)])
    maps = cls_attention_maps(teacher.encoder.float().cpu(), images)
    title = (
        "iBOT teacher, last block: [CLS] attention per head on held-out images\n"
        f"(k-NN top-1 {knn:.1f} %, chance {100 / len(index.classes):.1f} %)"
    )
    layout.write_figure(attention_figure(images, maps, cfg.mean, cfg.std, title), ctx.plots_dir / "attention.png", ctx)
    ctx.log_encoder(teacher.encoder, images)

    curve = [r for r in history if "loss" in r]
    last = curve[-1]
    speeds = [r["images_per_s"] for r in curve if trainer.resumed_from is None or r["step"] > trainer.resumed_from]
    return {
        "loss": round(last["loss"], 5),
        "loss_cls": round(last["loss_cls"], 5),
        "loss_mim": round(last["loss_mim"], 5),
        "loss_first": round(curve[0]["loss"], 5),
        "knn_top1": knn,
        "knn_chance": round(100 / len(index.classes), 3),
        "teacher_entropy": round(last["teacher_entropy"], 5),
        "teacher_kl": round(last["teacher_kl"], 5),
        "images_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "steps": p.total_steps,
        "epochs": p.epochs,
        "batch": p.batch,
        "peak_lr": p.lr,  # after warm-up; the per-step "lr" series is the schedule
        "encoder_params_m": round(sum(p_.numel() for p_ in teacher.encoder.parameters()) / 1e6, 3),
        "resumed_from_step": trainer.resumed_from,
    }


def pretrain_ibot(ctx: StageContext) -> dict:
    """Pretrain a ViT encoder with iBOT and save the teacher in the shared encoder format."""
    cfg: PretrainIBOT = ctx.section
    spec = cfg.model.spec()
    # ---- data: multi-crop views with block-wise masks; the labeled split for the k-NN
    data = load_data(ctx, cfg, spec.img_size, spec.patch_size)
    p = plan(ctx, cfg, len(data.loader))
    # ---- model: student (drop path) and teacher, an exact copy at step 0
    student, teacher = create_ibot_pair(spec, **cfg.head.model_dump(), drop_path=cfg.drop_path)
    teacher.to(ctx.device)
    # ---- optimisation
    ibot, trainer = build_trainer(ctx, cfg, student, teacher, p)
    mc = cfg.multicrop
    log.info(
        "%s, %d train images (%d global + %d x %d px local crops), %d epochs x %d steps, batch %d (%d x %d procs), lr "
        "%.3g",
        spec,
        len(data.train_set),
        2,
        mc.num_local,
        mc.local_size,
        p.epochs,
        p.steps_per_epoch,
        p.batch,
        cfg.batch_size,
        ctx.info.world_size,
        p.lr,
    )

    def on_epoch_end(epoch: int) -> dict | None:
        every = cfg.knn.every_epochs
        if not ctx.is_main or every is None or (epoch + 1) % every or epoch + 1 == p.epochs:
            return None
        return {"knn_top1": knn_top1(ctx, teacher, data.labeled, data.index.val, len(data.index.classes))}

    trainer.fit(data.loader, ibot.step_fn, on_epoch_end)
    if not ctx.is_main:
        return {}
    # ---- outputs
    return write_outputs(ctx, cfg, teacher, data, p, trainer)


if __name__ == "__main__":
    run_stage("pretrain_ibot", pretrain_ibot)
