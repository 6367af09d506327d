"""Stage ``prepare``: the datasets every later stage reads.

Classification (``data/classification``): the embedded shapes images, an ImageFolder tree or CIFAR-10,
written as ``index.json`` (+ images) and labeled subsets ``splits/labeled_<pct>_fold<k>.json``.
Detection (``data/detection``): the embedded shapes scenes or any COCO-format dataset, written as COCO
``train.json``/``val.json`` and the Soft Teacher splits ``splits/<pct>_fold<k>/{labeled,unlabeled}.json``.
Each dataset is built in a temporary directory and renamed into place, so a failure leaves the previous
data intact. No written path is absolute: images prepare writes are relative to their file's directory;
an external dataset's images are relative to its declared root (``prepare.classification.root``,
``prepare.detection.{train,val}_images``, named in the file), with a content hash per image, so the
prepared data moves with its folders and changes whenever a source image does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from components.data import shapes, sources, splits
from components.data.visualize import classification_sheet, coco_sheet
from components.io import DIR_MODE, write_json
from pipelines import layout
from pipelines.common import StageContext, classification_index, declared_root, run_stage
from pipelines.config import ClassificationData, DetectionData

log = logging.getLogger("mimflow.prepare")


def build_in_place(final: Path, build) -> dict:
    """Run ``build(tmp_dir)`` in a fresh sibling directory, then swap it in for ``final``. The old
    directory is renamed aside and deleted only once the new one is in place, so an interrupted swap
    leaves one whole dataset, never none."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, DIR_MODE)
    old = final.with_name(f".{final.name}.old")
    try:
        counts = build(tmp)
        if old.exists():  # left by an earlier swap that was killed
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old.exists() and not final.exists():
                os.replace(old, final)
            raise
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts


CLS_ROOT = "prepare.classification.root"


def relative_entries(items: list[tuple[str, int]], root: Path) -> list[list]:
    """[path relative to ``root`` (posix), label, content hash] per image: the index moves with the
    dataset's folder, and an image changed, added or removed changes the index."""
    root = root.resolve()
    return [[Path(p).resolve().relative_to(root).as_posix(), label, sources.content_hash(p)] for p, label in items]


def warn_untracked(project: Path, key: str, path: Path) -> None:
    """DVC sees changes to external images only under ``datasets/`` (a dependency of this stage)."""
    try:
        path.resolve().relative_to((project / layout.SOURCES).resolve())
    except ValueError:
        log.warning(
            "%s = %s is outside %s/: the index records each image's content hash, but `dvc status` will not "
            "see its images change until prepare re-runs (README: your own data)",
            key,
            path,
            layout.SOURCES,
        )


def classification_dataset(
    cfg: ClassificationData, seed: int, on_error: str, out: Path, project: Path = Path(".")
) -> dict:
    skipped: dict[str, int] = {}
    if cfg.source == "shapes":
        index = shapes.write_shapes_classification(
            out, cfg.image_size, cfg.train_per_class, cfg.val_per_class, seed, rotation=cfg.rotation, style=cfg.style
        )
    elif cfg.source == "imagefolder":
        root = sources.check_root(declared_root(project, cfg.root), CLS_ROOT, "prepare.classification")
        classes, train, skipped_train = sources.read_image_folder(root / "train", on_error=on_error)
        val_classes, val, skipped_val = sources.read_image_folder(root / "val", on_error=on_error)
        if val_classes != classes:
            raise sources.DataError(f"{root / 'val'}: classes {val_classes} differ from {root / 'train'}: {classes}")
        skipped = {f"train_{k}": v for k, v in skipped_train.items()} | {f"val_{k}": v for k, v in skipped_val.items()}
        index = {
            "source": "imagefolder",
            "root": CLS_ROOT,
            "classes": classes,
            "image_size": cfg.image_size,
            "train": relative_entries(train, root),
            "val": relative_entries(val, root),
        }
    else:  # cifar10
        classes, train_images, train_labels = sources.read_cifar10(cfg.root, train=True, download=cfg.download)
        _, val_images, val_labels = sources.read_cifar10(cfg.root, train=False, download=cfg.download)
        index = {
            "source": "cifar10",
            "classes": classes,
            "image_size": cfg.image_size,
            "train": sources.write_array_images(out, "images/train", train_images, train_labels, classes),
            "val": sources.write_array_images(out, "images/val", val_images, val_labels, classes),
        }
    write_json(out / "index.json", index, indent=None)
    n_train = len(index["train"])
    for percent in cfg.labeled_percents:
        for fold in range(cfg.folds):
            labeled, _ = splits.labeled_split(range(n_train), percent, fold, seed)
            write_json(
                out / layout.labeled_split_name(percent, fold),
                {"percent": percent, "fold": fold, "labeled": labeled},
                indent=None,
            )
    return {"classes": len(index["classes"]), "train": n_train, "val": len(index["val"]), "skipped": skipped}


def detection_dataset(cfg: DetectionData, seed: int, on_error: str, out: Path, project: Path = Path(".")) -> dict:
    skipped: dict[str, int] = {}
    if cfg.source == "shapes":
        train, val = shapes.write_shapes_detection(
            out,
            cfg.image_size,
            cfg.num_train,
            cfg.num_val,
            cfg.min_objects,
            cfg.max_objects,
            seed,
            rotation=cfg.rotation,
        )
    else:  # coco: validated; file names stay relative to the declared image roots, each image's content hashed
        parts = []
        for split, images, ann_file in (
            ("train", cfg.train_images, cfg.train_annotations),
            ("val", cfg.val_images, cfg.val_annotations),
        ):
            key = f"prepare.detection.{split}_images"
            root = sources.check_root(declared_root(project, images), key, "prepare.detection")
            coco, skipped_part = sources.read_coco(ann_file, on_error=on_error, image_root=root, check_images=True)
            info = {k: v for k, v in coco["info"].items() if k != "image_root"}
            coco["info"] = {**info, "root": key}
            coco["images"] = [{**im, "sha256": sources.content_hash(root / im["file_name"])} for im in coco["images"]]
            skipped |= {f"{split}_{k}": v for k, v in skipped_part.items() if v}
            parts.append(coco)
        train, val = parts
    write_json(out / "train.json", train, indent=None)
    write_json(out / "val.json", val, indent=None)
    ids = [im["id"] for im in train["images"]]
    split_sizes = {}
    for percent in cfg.labeled_percents:
        for fold in range(cfg.folds):
            labeled_ids, _ = splits.labeled_split(ids, percent, fold, seed)
            labeled, unlabeled = splits.split_coco(train, labeled_ids)
            d = out / layout.detection_split_name(percent, fold)
            for part in (labeled, unlabeled):  # image_root stays valid from the split's own directory
                if "image_root" in train["info"]:
                    part["info"] = {
                        **train["info"],
                        "image_root": os.path.relpath(out / train["info"]["image_root"], d),
                    }
            write_json(d / "labeled.json", labeled, indent=None)
            write_json(d / "unlabeled.json", unlabeled, indent=None)
            split_sizes[layout.detection_split_key(percent, fold)] = {
                "labeled": len(labeled["images"]),
                "unlabeled": len(unlabeled["images"]),
            }
    return {
        "categories": len(train["categories"]),
        "train_images": len(train["images"]),
        "train_boxes": len(train["annotations"]),
        "val_images": len(val["images"]),
        "val_boxes": len(val["annotations"]),
        "splits": split_sizes,
        "skipped": skipped,
    }


def prepare(ctx: StageContext) -> dict:
    """Write the classification and detection datasets, their splits, and a contact sheet."""
    cfg = ctx.section
    cls_counts = build_in_place(
        ctx.root / layout.CLASSIFICATION,
        lambda tmp: classification_dataset(cfg.classification, ctx.seed, cfg.on_error, tmp, ctx.root),
    )
    log.info("classification: %s", cls_counts)
    det_counts = build_in_place(
        ctx.root / layout.DETECTION, lambda tmp: detection_dataset(cfg.detection, ctx.seed, cfg.on_error, tmp, ctx.root)
    )
    log.info("detection: %s", det_counts)
    external = [(CLS_ROOT, cfg.classification.root)] if cfg.classification.source == "imagefolder" else []
    if cfg.detection.source == "coco":
        external += [
            ("prepare.detection.train_images", cfg.detection.train_images),
            ("prepare.detection.val_images", cfg.detection.val_images),
        ]
    for key, value in external:
        warn_untracked(ctx.root, key, declared_root(ctx.root, value))

    n = cfg.contact_sheet_samples
    index = classification_index(ctx)
    cls_sheet = classification_sheet(index.train, index.classes, per_class=max(1, n // 2))
    layout.write_figure(cls_sheet, ctx.plots_dir / "classification_samples.png", ctx)
    train_root = declared_root(ctx.root, cfg.detection.train_images) if cfg.detection.source == "coco" else None
    det_train = sources.load_coco(ctx.root / layout.DETECTION / "train.json", image_root=train_root)
    layout.write_figure(coco_sheet(det_train, num_images=n), ctx.plots_dir / "detection_samples.png", ctx)
    return {"classification": cls_counts, "detection": det_counts}


if __name__ == "__main__":
    run_stage("prepare", prepare)
