"""Stage ``finetune@<init>-<seed>``: fine-tune a classifier on the labeled split, for init in scratch | mae | ibot | cnn
and each seed of ``finetune.seeds``. The seed fixes the head's init, the data order, augmentation and
drop path; the labeled split is prepare's, so runs of the same seed are paired across inits.

ViTs follow MAE's fine-tuning recipe (layer-wise lr decay for pretrained encoders, avg pool + fc_norm,
drop path, Mixup/CutMix + label smoothing, RandAugment, random erasing, AdamW, warmup + cosine);
``cnn`` is a ResNet trained from scratch with the same data and schedule, the baseline CKA compares
against. Before fine-tuning, each ViT encoder is also evaluated frozen: a linear probe and a weighted
k-NN on its [CLS] feature (for ``scratch`` that is the random init, the floor the pretrained ones must beat).

Writes (``<run>`` = ``<init>-<seed>``) ``models/finetune/<run>/model.{safetensors,json}``,
``metrics/finetune/<run>.json``,
``plots/finetune/<run>/`` (per-epoch train/val CSVs, predictions for dvc's confusion template and a
confusion-matrix figure), resumable checkpoints in ``checkpoints/finetune/<run>/``, and the
classifier to MLflow (registered as ``mimflow-finetune-<init>``; the registry alias moves to this
version when its top-1 is strictly above that of the version holding it, on the same data and params).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from components.data.sources import ClassificationIndex, ImageListDataset
from components.data.splits import read_labeled_indices, split_digest
from components.evaluation.classification import confusion_figure, evaluate_classifier
from components.evaluation.knn import knn_accuracy
from components.evaluation.linear_probe import extract_pooled_features, fit_probe_head, probe_head
from components.io import file_digest, write_csv
from components.models.classifier import build_cnn_classifier, build_vit_classifier, cnn_meta, save_classifier, vit_meta
from components.models.vit import ViTSpec, create_vit, load_encoder, read_normalisation, read_spec
from components.training.distributed import EpochLoader
from components.training.early_stop import EarlyStopping, holdout_split
from components.training.engine import TrainConfig, Trainer
from components.training.finetune import (
    FinetuneStep,
    build_mixup,
    finetune_criterion,
    finetune_optimizer,
    finetune_transforms,
)
from components.training.schedules import stretch_epochs, warmup_cosine
from pipelines import layout
from pipelines.common import StageContext, classification_index, run_stage

log = logging.getLogger("mimflow.finetune")


def labeled_split(ctx: StageContext, num_train: int) -> tuple[Path, list[int]]:
    cfg = ctx.section
    path = ctx.root / layout.existing_labeled_split(ctx, "finetune", cfg.labeled_percent, cfg.fold)
    return path, read_labeled_indices(path, num_train)


def build_model(ctx: StageContext, init: str, num_classes: int, image_size: int, classes: list[str]):
    """(model, meta for model.json, ViT depth or None, layer decay or None, encoder dir or None)."""
    cfg = ctx.section
    if init == "cnn":
        c = cfg.cnn
        model = build_cnn_classifier(c.arch, num_classes, image_size, c.width)
        return model, cnn_meta(c.arch, num_classes, image_size, c.width, classes), None, None, None
    v = cfg.vit
    encoder_dir = ctx.root / layout.ENCODER_DIRS[init] if init in layout.ENCODER_DIRS else None
    if encoder_dir is not None:
        spec = read_spec(encoder_dir)
        if spec.img_size != image_size:
            raise ValueError(
                f"{encoder_dir / 'encoder.json'}: encoder img_size {spec.img_size} differs from the data's image_size "
                f"{image_size}"
            )
        model, spec = build_vit_classifier(
            num_classes, encoder_dir=encoder_dir, global_pool=v.global_pool, drop_path_rate=v.drop_path
        )
        layer_decay = v.layer_decay  # BEiT/MAE: protect the pretrained lower layers
    else:
        spec = v.scratch_model.spec()
        if spec.img_size != image_size:
            raise ValueError(
                f"finetune.vit.scratch_model: img_size {spec.img_size} differs from the data's image_size "
                f"{image_size} (set finetune.vit.scratch_model.img_size)"
            )
        model, spec = build_vit_classifier(
            num_classes, spec=spec, global_pool=v.global_pool, drop_path_rate=v.drop_path
        )
        layer_decay = None  # a random init has no lower layers worth protecting
    return model, vit_meta(spec, num_classes, v.global_pool, classes), spec.depth, layer_decay, encoder_dir


def normalisation(cfg, encoder_dir: Path | None) -> tuple[tuple, tuple]:
    """Input mean/std: a pretrained encoder's own (when its encoder.json records them), else finetune.mean/std."""
    own = read_normalisation(encoder_dir) if encoder_dir is not None else None
    return own or (tuple(cfg.mean), tuple(cfg.std))


def transforms(cfg, size: int, mean: tuple, std: tuple):
    """(train, eval) transforms of ``finetune``'s augmentation params (MAE Sec. A.1, timm ``create_transform``)."""
    return finetune_transforms(
        size,
        cfg.rand_augment or None,
        cfg.re_prob,
        tuple(cfg.crop_scale),
        mean,
        std,
        eval_crop_pct=cfg.eval_crop_pct,
        hflip=cfg.hflip,
    )


def frozen_evaluation(ctx: StageContext, init: str, spec_or_dir, train_loader, val_loader, num_classes: int) -> dict:
    """Linear probe and weighted k-NN on the frozen encoder's pooled feature (before fine-tuning)."""
    cfg = ctx.section
    with torch.random.fork_rng(devices=[]):  # the fine-tuning run's random stream stays the same with or without this
        torch.manual_seed(ctx.seed + 1)
        if isinstance(spec_or_dir, Path):
            encoder, _ = load_encoder(spec_or_dir, num_classes=0, global_pool="token")
        else:
            encoder = create_vit(spec_or_dir, num_classes=0, global_pool="token")
        encoder.to(ctx.device)
        pool = cfg.linear_probe.pool
        train_x, train_y = extract_pooled_features(encoder, train_loader, pool, ctx.device)
        val_x, val_y = extract_pooled_features(encoder, val_loader, pool, ctx.device)
        out = {}
        if cfg.knn.enabled:
            out["knn_top1"] = knn_accuracy(
                train_x, train_y, val_x, val_y, num_classes, k=cfg.knn.k, T=cfg.knn.temperature
            )
        if cfg.linear_probe.enabled:
            p = cfg.linear_probe
            head = probe_head(train_x.shape[1], num_classes)
            fit_probe_head(
                head, train_x, train_y, p.epochs, p.batch_size, p.blr, p.weight_decay, p.warmup_epochs, seed=ctx.seed
            )
            with torch.no_grad():
                out["linear_probe_top1"] = 100.0 * float((head(val_x).argmax(1) == val_y).float().mean())
    log.info("%s frozen encoder: %s", init, out)
    return out


@dataclass
class Data:
    """The labeled split (training) and the held-out images, with the views of the model's normalisation."""

    index: ClassificationIndex
    split_path: Path
    labeled: list[int]
    train_items: list  # the labeled images trained on (all but early stopping's held-out part)
    loader: EpochLoader  # augmented (RandAugment, random erasing; Mixup/CutMix in the step)
    train_eval: DataLoader  # the trained-on images in the evaluation view (frozen probe and k-NN)
    val: DataLoader
    held: DataLoader | None  # early stopping's held-out labels (None when off): never trained on


def load_data(ctx: StageContext, index: ClassificationIndex, split_path: Path, labeled: list[int], mean, std) -> Data:
    cfg = ctx.section
    train_tf, eval_tf = transforms(cfg, index.image_size, mean, std)
    fit_ids, held_ids = holdout_split(
        labeled, [index.train[i][1] for i in labeled], cfg.early_stop.holdout_fraction, ctx.seed
    )
    train_items = [index.train[i] for i in fit_ids]
    loader = EpochLoader(
        ImageListDataset(train_items, train_tf),
        cfg.batch_size,
        seed=ctx.seed,
        info=ctx.info,
        num_workers=ctx.num_workers,
    )

    def eval_loader(items):
        return DataLoader(ImageListDataset(items, eval_tf), batch_size=cfg.eval_batch_size, num_workers=ctx.num_workers)

    held = eval_loader([index.train[i] for i in held_ids]) if held_ids else None
    return Data(index, split_path, labeled, train_items, loader, eval_loader(train_items), eval_loader(index.val), held)


def build_trainer(
    ctx: StageContext,
    model: torch.nn.Module,
    depth: int | None,
    layer_decay: float | None,
    encoder_dir: Path | None,
    data: Data,
    early: EarlyStopping,
) -> tuple[Trainer, FinetuneStep, int, int]:
    """AdamW with layer-wise lr decay (pretrained ViTs), lr = blr x batch / 256 warmed up then cosine, Mixup/CutMix
    with label smoothing (MAE Sec. A.1). Returns the trainer, the step, the epochs and the steps per epoch."""
    cfg, init = ctx.section, ctx.item
    num_classes = len(data.index.classes)
    blr = cfg.cnn.blr if init == "cnn" else cfg.vit.blr
    wd = cfg.cnn.weight_decay if init == "cnn" else cfg.vit.weight_decay
    steps_per_epoch = len(data.loader) // cfg.accum_steps
    epochs, warmup_epochs = stretch_epochs(cfg.epochs, cfg.warmup_epochs, steps_per_epoch, cfg.min_steps)
    total = epochs * steps_per_epoch
    lr = blr * cfg.batch_size * cfg.accum_steps * ctx.info.world_size / 256
    optimizer = finetune_optimizer(model, wd, layer_decay, depth, ctx.device)
    mixup = build_mixup(num_classes, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
    step_fn = FinetuneStep(finetune_criterion(mixup, cfg.label_smoothing), mixup, seed=ctx.seed, rank=ctx.info.rank)
    train_cfg = TrainConfig(
        total_steps=total,
        batch_size=cfg.batch_size,
        accum_steps=cfg.accum_steps,
        clip_grad=cfg.clip_grad,
        precision=ctx.precision,
        ckpt_dir=ctx.checkpoint_dir,
        ckpt_every=cfg.ckpt_every,
        log_every=1,
        fingerprint=ctx.fingerprint(ctx.root / layout.CLASSIFICATION, *([encoder_dir] if encoder_dir else [])),
        desc=ctx.stage_id,
        progress=ctx.params.runtime.progress,
        compile=ctx.params.runtime.compile,
    )
    trainer = Trainer(
        model,
        optimizer,
        train_cfg,
        ctx.device,
        ctx.info,
        lr_fn=lambda s: warmup_cosine(s, total, round(warmup_epochs * steps_per_epoch), lr, cfg.min_lr),
        on_log=lambda step, rec: log_val_epoch(ctx, rec, step // steps_per_epoch),
        extra_state={"early_stop": early} if data.held else None,
        stop_when=lambda: early.stopped,
    )
    return trainer, step_fn, epochs, steps_per_epoch


def write_outputs(
    ctx: StageContext,
    model: torch.nn.Module,
    meta: dict,
    data: Data,
    trainer: Trainer,
    steps_per_epoch: int,
    final_epoch: int,
    train_s: float,
) -> dict:
    """The held-out evaluation, per-epoch curves, predictions and the confusion figure, the classifier's weights
    and its registration; the metrics of the fine-tuned model."""
    index, num_classes = data.index, len(data.index.classes)
    history = trainer.history
    final = evaluate_classifier(model, data.val, num_classes, ctx.device)
    if not ctx.is_main:
        return {}

    # ---- per-epoch curves, best epoch
    train_rows, val_rows = epoch_curves(history)
    if all(r["epoch"] != final_epoch for r in val_rows):  # early stopping may restore an evaluated epoch's state
        val_rows.append({"epoch": final_epoch, **{f"val_{k}": final[k] for k in ("top1", "top5", "loss")}})
    best = max(val_rows, key=lambda r: r["val_top1"])
    plots = ctx.plots_dir
    write_csv(plots / "train.csv", train_rows, ["epoch", "train_loss", "lr"])
    write_csv(plots / "val.csv", val_rows, ["epoch", "val_top1", "val_top5", "val_loss"])
    cm = final["confusion"]
    pred_rows = [
        {"actual": index.classes[i], "predicted": index.classes[j]}
        for i in range(num_classes)
        for j in range(num_classes)
        for _ in range(int(cm[i, j]))
    ]
    write_csv(plots / "predictions.csv", pred_rows, ["actual", "predicted"])
    fig = confusion_figure(cm, index.classes, title=f"{ctx.stage_id}: top-1 {final['top1']:.1f} %")
    for row in train_rows:  # per epoch, the axis of the val_ series (the figure and results go at the last epoch)
        ctx.log_metrics({"epoch_train_loss": row["train_loss"]}, step=row["epoch"])
    layout.write_figure(fig, plots / "confusion.png", ctx)

    # ---- weights for cka/report, and the model registry
    model = model.cpu().eval()
    save_classifier(model, ctx.models_dir, meta)
    steps_done = [r for r in history if "images_per_s" in r]
    metrics = {
        "top1": final["top1"],
        "top5": final["top5"],
        "val_loss": final["loss"],
        "best_top1": best["val_top1"],
        "best_epoch": int(best["epoch"]),
        "epochs": trainer.step // steps_per_epoch,  # fewer than the schedule's when early stopping ended it
        "steps": trainer.step,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_s": round(train_s, 2),
        "train_images_per_s": round(sum(r["images_per_s"] for r in steps_done) / max(len(steps_done), 1), 1),
    }
    register(ctx, model, ctx.item, final["top1"], data.val)
    return metrics


def finetune(ctx: StageContext) -> dict:
    """Fine-tune one initialisation on the labeled split and evaluate it on the held-out set."""
    cfg, init = ctx.section, ctx.item
    # ---- data: the labeled split
    index = classification_index(ctx)
    split_path, labeled = labeled_split(ctx, len(index.train))
    num_classes = len(index.classes)
    world = ctx.info.world_size
    if cfg.batch_size * world > len(labeled):
        raise ValueError(
            f"finetune.batch_size = {cfg.batch_size}: larger than the {len(labeled)} labeled images ({world} "
            "process(es))"
        )
    # ---- model, then the views of its input normalisation
    model, meta, depth, layer_decay, encoder_dir = build_model(ctx, init, num_classes, index.image_size, index.classes)
    data = load_data(ctx, index, split_path, labeled, *normalisation(cfg, encoder_dir))

    metrics: dict = {
        "init": init,
        "seed": ctx.seed,
        "split": str(split_path.relative_to(ctx.root)),
        "split_digest": split_digest(labeled),
        "labeled_images": len(labeled),
        "holdout_images": len(labeled) - len(data.train_items),
        "val_images": len(index.val),
        "classes": num_classes,
    }
    if init != "cnn" and ctx.is_main and (cfg.linear_probe.enabled or cfg.knn.enabled):
        t = time.perf_counter()
        metrics.update(
            frozen_evaluation(ctx, init, encoder_dir or read_meta_spec(meta), data.train_eval, data.val, num_classes)
        )
        metrics["frozen_eval_s"] = round(time.perf_counter() - t, 2)

    # ---- optimisation
    early = EarlyStopping(cfg.early_stop.patience)
    trainer, step_fn, epochs, steps_per_epoch = build_trainer(ctx, model, depth, layer_decay, encoder_dir, data, early)

    def score_holdout(epoch: int) -> None:  # top-1 on the held-out labels, ties broken by the lower loss
        res = evaluate_classifier(model, data.held, num_classes, ctx.device)
        early.update(
            (res["top1"], -res["loss"]),
            epoch + 1,
            lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
        )

    def on_epoch_end(epoch: int) -> dict | None:
        if (epoch + 1) % cfg.eval_every or epoch + 1 == epochs:  # the last epoch is evaluated after fit
            return None
        if data.held:
            score_holdout(epoch)
        res = evaluate_classifier(model, data.val, num_classes, ctx.device)
        return {"val_top1": res["top1"], "val_top5": res["top5"], "val_loss": res["loss"]}

    t = time.perf_counter()
    trainer.fit(data.loader, step_fn, on_epoch_end)
    train_s = time.perf_counter() - t
    if data.held:  # the last epoch's score, then the best state back
        if not early.stopped:
            score_holdout(epochs - 1)
        model.load_state_dict(early.best_state)
        metrics["early_stop"] = {
            "best_epoch": early.best_epoch,
            "stopped": early.stopped,
            "holdout_top1": early.best_score[0],
        }
    # ---- outputs
    final_epoch = early.best_epoch if data.held else epochs  # early stopping restored its best epoch's state
    out = write_outputs(ctx, model, meta, data, trainer, steps_per_epoch, final_epoch, train_s)
    return {**metrics, **out} if out else {}


def log_val_epoch(ctx: StageContext, record: dict, epochs_done: int) -> None:
    """Validation results at the epoch they close: MLflow's step axis of this stage is the epoch."""
    if "val_top1" in record:
        ctx.log_metrics({k: v for k, v in record.items() if k.startswith("val_")}, step=epochs_done)


def read_meta_spec(meta: dict) -> ViTSpec:
    return ViTSpec(
        **{k: meta[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans")}
    )


def epoch_curves(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Mean training loss and last lr per epoch, and the validation records, from the engine's history."""
    by_epoch: dict[int, list[dict]] = {}
    val_rows = []
    for rec in history:
        if "val_top1" in rec:
            val_rows.append({"epoch": rec["epoch"] + 1, **{k: rec[k] for k in ("val_top1", "val_top5", "val_loss")}})
        elif "loss" in rec:
            by_epoch.setdefault(rec["epoch"], []).append(rec)
    train_rows = [
        {"epoch": e + 1, "train_loss": sum(r["loss"] for r in recs) / len(recs), "lr": recs[-1]["lr"]}
        for e, recs in sorted(by_epoch.items())
    ]
    return train_rows, val_rows


def register(ctx: StageContext, model: torch.nn.Module, init: str, top1: float, val_loader) -> None:
    """Log the classifier to MLflow with a signature and register it; the alias moves here only on a strictly
    higher top-1 than the version holding it, trained on the same data with the same params."""
    name = f"mimflow-finetune-{init}"
    example = next(iter(val_loader))[0][:2]  # [2, 3, H, W]: a batch of 2 keeps the exported batch dimension dynamic
    t = time.perf_counter()
    ctx.tracker.log_model(
        model,
        name="classifier",
        input_example=example,
        registered_name=name,
        score=("top1", top1),
        data=file_digest(ctx.root / layout.CLASSIFICATION),
    )
    if ctx.tracker.enabled and ctx.params.tracking.log_models:
        log.info("logged %s to MLflow in %.1f s", name, time.perf_counter() - t)


if __name__ == "__main__":
    run_stage("finetune", finetune, variant_arg="init", variants=layout.INITS, seeded=True)
