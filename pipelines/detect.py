"""Stage ``detect@<method>-<percent>-<seed>``: semi-supervised detection with Soft Teacher vs the supervised baseline,
once per seed of ``detect.seeds`` (the seed fixes the heads' init, the data order and the views; the
labeled split is prepare's, so runs of the same seed are paired across methods).

``softteacher`` trains a Faster R-CNN on batches of labeled and unlabeled scenes (1:4) with an EMA
teacher that pseudo-labels weak views for the student's strong views (Xu et al. 2021);
``supervised`` trains the same detector with the same schedule on the labeled scenes only. Both keep
the EMA teacher, so the two are evaluated the same way (teacher and student, COCO AP with pycocotools
on the held-out scenes). The labeled percents are prepare's (``prepare.detection.labeled_percents``).

Writes (``<run>`` = ``<method>-<percent>-<seed>``) ``metrics/detect/<run>.json``, ``plots/detect/<run>/`` (AP and loss
over training for dvc plots, predictions against ground truth on held-out scenes),
``models/detect/<run>/`` (the teacher at the top, the student in ``student/``:
safetensors + detector.json), resumable checkpoints in ``checkpoints/detect/<run>/``, and
the teacher to MLflow (registered as ``mimflow-detect-<method>-<percent>``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.data.box_transforms import SemiSupervisedViews, ViewConfig, collate_views
from components.data.sources import CocoDetection, DataError, load_coco
from components.evaluation.coco import AP_KEYS, coco_evaluate, predict, prediction_figure, to_coco_results
from components.io import file_digest, write_csv
from components.models.detection import DetectorSpec, save_detector
from components.models.vit import read_normalisation, read_spec
from components.semisup.soft_teacher import SoftTeacher, SoftTeacherConfig, build_soft_teacher
from components.training.distributed import EpochLoader
from components.training.engine import TrainConfig, Trainer, compile_backend
from components.training.optim import FINETUNE_NO_DECAY, param_groups
from components.training.schedules import multistep
from pipelines import layout
from pipelines.common import StageContext, declared_root, run_stage

log = logging.getLogger("mimflow.detect")


LOSS_KEYS = (  # the columns of plots/detect/<run>/loss.csv, those the run logged
    "loss",
    "sup_loss_classifier",
    "sup_loss_box_reg",
    "sup_loss_objectness",
    "sup_loss_rpn_box_reg",
    "unsup_loss_classifier",
    "unsup_loss_box_reg",
    "unsup_loss_objectness",
    "unsup_loss_rpn_box_reg",
    "pseudo_boxes_cls",
    "pseudo_boxes_reg",
    "lr",
)


def parse_variant(variant: str) -> tuple[str, float]:
    """'softteacher-10' -> ('softteacher', 10.0); errors name the expected form."""
    method, _, pct = variant.partition("-")
    try:
        percent = float(pct)
    except ValueError:
        percent = -1.0
    if method not in layout.METHODS or not 0 < percent <= 100:
        raise ValueError(
            f"detect: variant {variant!r} is not <method>-<percent> with method in {', '.join(layout.METHODS)} "
            "and percent in (0, 100]"
        )
    return method, percent


def merge_categories(coco: dict, name: str = "object") -> dict:
    """The same COCO dict with every category merged into one (class-agnostic detection)."""
    return {
        **coco,
        "categories": [{"id": 1, "name": name, "supercategory": name}],
        "annotations": [{**a, "category_id": 1} for a in coco["annotations"]],
    }


def load_split(ctx: StageContext, percent: float) -> tuple[dict, dict, dict]:
    """(labeled, unlabeled, val) COCO dicts of the split.

    Split files hold subsets of train.json's images, so they are read against its image directory."""
    root = ctx.root / layout.DETECTION
    split_dir = ctx.root / layout.detection_split_dir(percent, ctx.section.fold)
    if not split_dir.is_dir():
        have = ctx.params.prepare.detection
        raise DataError(
            f"{split_dir}: no detection split for percent {layout.pct_name(percent)}, detect.fold = {ctx.section.fold} "
            f"(prepare.detection.labeled_percents = {have.labeled_percents}, folds = {have.folds})"
        )
    have = ctx.params.prepare.detection  # an external COCO set's files are relative to its declared image roots
    train = load_coco(
        root / "train.json", image_root=declared_root(ctx.root, have.train_images) if have.source == "coco" else None
    )
    image_root = train["info"]["image_root"]
    labeled = load_coco(split_dir / "labeled.json", image_root=image_root)
    unlabeled = load_coco(split_dir / "unlabeled.json", image_root=image_root)
    val = load_coco(
        root / "val.json", image_root=declared_root(ctx.root, have.val_images) if have.source == "coco" else None
    )
    if ctx.section.val_images is not None:
        keep = {im["id"] for im in val["images"][: ctx.section.val_images]}
        val = {
            **val,
            "images": [im for im in val["images"] if im["id"] in keep],
            "annotations": [a for a in val["annotations"] if a["image_id"] in keep],
        }
    if not labeled["images"]:
        raise DataError(f"{split_dir / 'labeled.json'}: no labeled images")
    if not val["annotations"]:
        raise DataError(
            f"{root / 'val.json'}: no boxes in the held-out images (detect.val_images = {ctx.section.val_images}), "
            "nothing to evaluate against"
        )
    if ctx.section.class_agnostic:
        labeled, unlabeled, val = merge_categories(labeled), merge_categories(unlabeled), merge_categories(val)
    return labeled, unlabeled, val


def views_config(cfg) -> ViewConfig:
    """Soft Teacher's weak and strong views (Sec. 3.3) from ``detect.views``.

    Flip, resize, colour, geometry, erasing.
    """
    v = cfg.views
    return ViewConfig(
        **v.model_dump(exclude={"short_side_range"}), short_side=v.short_side_range, max_size=cfg.model.max_size
    )


def detector_spec(ctx: StageContext, num_classes: int) -> tuple[DetectorSpec, Path | None]:
    """The detector's spec from detect.model, and the pretrained ViT encoder's directory if any. A
    pretrained ViT is fed the input normalisation its encoder.json records, as finetune does."""
    m = ctx.section.model
    encoder_dir, vit, norm = None, None, {}
    if m.backbone == "vit":
        if m.init in layout.ENCODER_DIRS:
            encoder_dir = ctx.root / layout.ENCODER_DIRS[m.init]
            vit = read_spec(encoder_dir).to_dict()
            own = read_normalisation(encoder_dir)
            if own:
                norm = {"image_mean": own[0], "image_std": own[1]}
        else:
            vit = ctx.params.pretrain_mae.model.spec().to_dict()  # a scratch ViT shaped like the pretrained ones
    fields = m.model_dump(exclude={"init"})
    return DetectorSpec(num_classes=num_classes, vit=vit, **fields, **norm), encoder_dir


def evaluate(
    model: torch.nn.Module, val: dict, dataset: CocoDetection, label_to_category: list[int], ctx: StageContext
) -> tuple[dict, list[dict]]:
    items = ((dataset.images[i]["id"], dataset[i][0]) for i in range(len(dataset)))
    detections = predict(model, items, ctx.device, ctx.section.eval_batch_size)
    return coco_evaluate(val, to_coco_results(detections, label_to_category)), detections


def compile_backbones(*detectors: torch.nn.Module) -> None:
    """``runtime.compile`` for detectors: the backbones (ResNet/ViT + FPN, most of the FLOPs) in place, with
    dynamic shapes. The whole Soft Teacher step does not compile usefully: the RPN, RoI pooling and
    pseudo-box code are data-dependent (torchvision's ``MultiScaleRoIAlign`` breaks the graph) and every
    new image size recompiles; on an H200 four smoke steps had not finished after 106 s, and on a CPU
    two Soft Teacher steps took 459 s (benchmarks/README.md)."""
    for detector in detectors:
        detector.backbone.compile(dynamic=True, backend=compile_backend())


@dataclass
class Data:
    """One labeled split of the detection set, as the step and the evaluation read it."""

    method: str
    percent: float
    labeled: dict  # COCO dicts
    unlabeled: dict
    val: dict
    categories: list[int]  # COCO category ids; label i + 1 is categories[i] (torchvision: 0 is background)
    names: dict[int, str]
    ratio: int  # unlabeled images per labeled image in a batch (0: the supervised baseline)
    loader: EpochLoader
    val_set: CocoDetection

    @property
    def category_to_label(self) -> dict[int, int]:
        return {c: i + 1 for i, c in enumerate(self.categories)}


def load_data(ctx: StageContext) -> Data:
    """The variant's split: labeled images (weak view + colour), and for Soft Teacher ``unlabeled_ratio``
    unlabeled images per labeled one as weak/strong view pairs (Sec. 3.3); the held-out scenes."""
    cfg = ctx.section
    method, percent = parse_variant(ctx.item)
    labeled, unlabeled, val = load_split(ctx, percent)
    categories = sorted(c["id"] for c in labeled["categories"])
    names = {c["id"]: c["name"] for c in labeled["categories"]}
    ratio = cfg.soft_teacher.unlabeled_ratio if method == "softteacher" else 0
    if ratio and not unlabeled["images"]:
        raise DataError(f"{ctx.stage_id}: the split has no unlabeled images for Soft Teacher")
    world = ctx.info.world_size
    if cfg.batch_size * world > len(labeled["images"]):
        raise ValueError(
            f"detect.batch_size = {cfg.batch_size}: larger than the {len(labeled['images'])} labeled images ({world} "
            "process(es))"
        )
    category_to_label = {c: i + 1 for i, c in enumerate(categories)}
    dataset = SemiSupervisedViews(
        CocoDetection(labeled), CocoDetection(unlabeled) if ratio else None, category_to_label, ratio, views_config(cfg)
    )
    loader = EpochLoader(
        dataset, cfg.batch_size, seed=ctx.seed, info=ctx.info, num_workers=ctx.num_workers, collate_fn=collate_views
    )
    if ratio:  # burn-in's whole epochs load no unlabeled views (the step would drop them)
        dataset.unlabeled_from_epoch = cfg.soft_teacher.burn_in_steps // len(loader)
    return Data(method, percent, labeled, unlabeled, val, categories, names, ratio, loader, CocoDetection(val))


def build_model(ctx: StageContext, d: Data) -> tuple[SoftTeacher, DetectorSpec, Path | None]:
    """Student and EMA teacher (Faster R-CNN of detect.model) with the Soft Teacher loss; the supervised
    baseline is the same model without burn-in, trained without unlabeled images."""
    st = ctx.section.soft_teacher
    spec, encoder_dir = detector_spec(ctx, len(d.categories))
    init = ctx.section.model.init
    pretrained = init if spec.backbone != "vit" and init != "scratch" else "none"
    st_cfg = SoftTeacherConfig(
        **st.model_dump(exclude={"unlabeled_ratio", "burn_in_steps"}),
        burn_in_steps=st.burn_in_steps if d.method == "softteacher" else 0,
    )
    model = build_soft_teacher(spec, st_cfg, pretrained=pretrained, encoder_dir=encoder_dir)
    if ctx.params.runtime.compile:
        compile_backbones(model.student, model.teacher)
    return model, spec, encoder_dir


def build_trainer(ctx: StageContext, d: Data, model: SoftTeacher, encoder_dir: Path | None) -> Trainer:
    """SGD (or AdamW) on the student, norms and biases exempt from weight decay; lr steps x0.1 at
    ``lr_milestones`` after a linear warm-up; the teacher's EMA update after every optimizer step."""
    cfg = ctx.section
    groups = param_groups(model.student, cfg.weight_decay, no_weight_decay=FINETUNE_NO_DECAY)
    clean = [{k: val_ for k, val_ in g.items() if k != "names"} for g in groups]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(clean, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas), fused=ctx.device.type == "cuda" or None)
    milestones = [round(f * cfg.steps) for f in cfg.lr_milestones]
    train_cfg = TrainConfig(
        total_steps=cfg.steps,
        batch_size=cfg.batch_size * (1 + d.ratio),
        clip_grad=cfg.clip_grad,
        precision=ctx.precision,
        ckpt_dir=ctx.checkpoint_dir,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        fingerprint=ctx.fingerprint(
            d.method, d.percent, ctx.root / layout.DETECTION, *([encoder_dir] if encoder_dir else [])
        ),
        desc=ctx.stage_id,
        progress=ctx.params.runtime.progress,
    )

    def on_log(step: int, record: dict) -> None:
        ctx.log_metrics({k: v for k, v in record.items() if k not in ("step", "epoch")}, step)

    return Trainer(
        model,
        optimizer,
        train_cfg,
        ctx.device,
        ctx.info,
        lr_fn=lambda s: multistep(s, cfg.lr, milestones, 0.1, cfg.warmup_steps),
        after_step=model.update_teacher,
        on_log=on_log,
    )


def soft_teacher_step(model: SoftTeacher):
    """The engine's ``step_fn``: the labeled batch, plus the unlabeled views once burn-in is over."""

    def step_fn(m, batch, step):
        unlabeled = (
            [batch.get(k) for k in ("weak", "strong", "weak_matrix", "strong_matrix")]
            if model.semi_supervised(step)
            else []
        )
        out = m(batch["labeled"], batch["targets"], *unlabeled)
        return out["loss"], {k: float(v.detach()) for k, v in out.items() if k != "loss"}

    return step_fn


def write_curves(ctx: StageContext, history: list[dict], teacher_ap: dict, student_ap: dict) -> None:
    """``ap.csv`` (teacher and student AP at each evaluation, the final one last) and ``loss.csv`` for dvc plots."""
    cfg = ctx.section
    plots = ctx.plots_dir
    ap_rows = [
        {"step": r["step"], **{k: r[k] for k in r if k.startswith(("teacher_", "student_"))}}
        for r in history
        if "teacher_AP" in r
    ]
    ap_rows.append(
        {
            "step": cfg.steps,
            **{f"teacher_{k}": v for k, v in teacher_ap.items()},
            **{f"student_{k}": v for k, v in student_ap.items()},
        }
    )
    write_csv(plots / "ap.csv", ap_rows, ["step", *(f"{who}_{k}" for who in ("teacher", "student") for k in AP_KEYS)])
    loss_rows = [r for r in history if "loss" in r]
    write_csv(plots / "loss.csv", loss_rows, ["step", *(k for k in LOSS_KEYS if any(k in r for r in loss_rows))])


def write_predictions(ctx: StageContext, d: Data, teacher_ap: dict, teacher_dets: list[dict]) -> None:
    """The teacher's detections against the ground truth on the first held-out scenes."""
    cfg, plots, names, categories = ctx.section, ctx.plots_dir, d.names, d.categories
    n = min(cfg.figure_images, len(d.val_set))
    samples = [d.val_set[i] for i in range(n)]
    category_to_label = d.category_to_label
    truths = [
        {
            "boxes": torch.as_tensor(tg["boxes"]),
            "labels": torch.tensor([category_to_label[int(c)] for c in tg["labels"]], dtype=torch.int64),
        }
        for _, tg in samples
    ]
    fig = prediction_figure(
        [img for img, _ in samples],
        truths,
        teacher_dets[:n],
        [names[c] for c in categories],
        cfg.figure_score,
        title=f"{ctx.stage_id}: teacher AP {100 * teacher_ap['AP']:.1f} (green dashed: ground truth, red: detections "
        f">= {cfg.figure_score:g})",
    )
    layout.write_figure(fig, plots / "predictions.png", ctx)


def write_outputs(
    ctx: StageContext, d: Data, model: SoftTeacher, spec: DetectorSpec, history: list[dict], train_s: float
) -> dict:
    """COCO AP of teacher and student, the AP and loss curves, the teacher's predictions figure, both
    detectors' weights, the registered teacher; the metrics."""
    cfg = ctx.section
    labeled, unlabeled, val, categories, names = d.labeled, d.unlabeled, d.val, d.categories, d.names
    t = time.perf_counter()
    teacher_ap, teacher_dets = evaluate(model.teacher, val, d.val_set, categories, ctx)
    student_ap, _ = evaluate(model.student, val, d.val_set, categories, ctx)
    eval_s = time.perf_counter() - t
    write_curves(ctx, history, teacher_ap, student_ap)
    write_predictions(ctx, d, teacher_ap, teacher_dets)

    # ---- weights (teacher at the top, student below) and the model registry
    meta = {
        "method": d.method,
        "percent": d.percent,
        "classes": [names[c] for c in categories],
        "category_ids": categories,
    }
    save_detector(model.teacher.cpu(), spec, ctx.models_dir, role="teacher", **meta)
    save_detector(model.student.cpu(), spec, ctx.models_dir / "student", role="student", **meta)
    steps_done = [r for r in history if "images_per_s" in r]
    metrics = {
        "method": d.method,
        "percent": d.percent,
        "seed": ctx.seed,
        "fold": cfg.fold,
        "class_agnostic": cfg.class_agnostic,
        "burn_in_steps": model.cfg.burn_in_steps,
        "labeled_images": len(labeled["images"]),
        "unlabeled_images": len(unlabeled["images"]) if d.ratio else 0,
        "val_images": len(val["images"]),
        "steps": cfg.steps,
        "AP": teacher_ap["AP"],
        "AP50": teacher_ap["AP50"],
        "teacher": teacher_ap,
        "student": student_ap,
        "params_m": round(sum(p.numel() for p in model.student.parameters()) / 1e6, 3),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "train_images_per_s": round(sum(r["images_per_s"] for r in steps_done) / max(len(steps_done), 1), 2),
    }
    register(ctx, model.teacher.eval(), teacher_ap["AP"])
    return metrics


def detect(ctx: StageContext) -> dict:
    """Train one method on one labeled split and evaluate teacher and student on the held-out scenes."""
    cfg = ctx.section
    # ---- data: the labeled split (+ unlabeled views for Soft Teacher), the held-out scenes
    d = load_data(ctx)
    # ---- model: student, EMA teacher, the Soft Teacher loss
    model, spec, encoder_dir = build_model(ctx, d)
    # ---- optimisation
    trainer = build_trainer(ctx, d, model, encoder_dir)
    steps_per_epoch = len(d.loader)

    def on_epoch_end(epoch: int) -> dict | None:
        """AP of teacher and student whenever training crossed a multiple of eval_every steps."""
        end = (epoch + 1) * steps_per_epoch
        if end // cfg.eval_every == (end - steps_per_epoch) // cfg.eval_every or end >= cfg.steps or not ctx.is_main:
            return None
        teacher_ap, _ = evaluate(model.teacher, d.val, d.val_set, d.categories, ctx)
        student_ap, _ = evaluate(model.student, d.val, d.val_set, d.categories, ctx)
        return {
            **{f"teacher_{k}": v for k, v in teacher_ap.items()},
            **{f"student_{k}": v for k, v in student_ap.items()},
        }

    t = time.perf_counter()
    history = trainer.fit(d.loader, soft_teacher_step(model), on_epoch_end)
    train_s = time.perf_counter() - t
    if not ctx.is_main:
        return {}
    # ---- outputs
    return write_outputs(ctx, d, model, spec, history, train_s)


def register(ctx: StageContext, model: torch.nn.Module, ap: float) -> None:
    """Log the teacher to MLflow and register it; the alias moves here only on a strictly higher AP than the
    version holding it, trained on the same data with the same params."""
    ctx.tracker.log_model(
        model,
        name="detector",
        registered_name=f"mimflow-detect-{ctx.item}",
        score=("AP", ap),
        data=file_digest(ctx.root / layout.DETECTION),
        serialization_format="pickle",
    )


if __name__ == "__main__":
    run_stage("detect", detect, variant_arg="variant", seeded=True)
