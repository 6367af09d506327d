"""Stage ``baselines``: raw-pixel baselines on the split the fine-tuned models use.

A logistic regression (to convergence) and the weighted k-NN on flattened, normalised pixels
(``components.evaluation.baselines``), trained on finetune's labeled split (``finetune.labeled_percent``,
``finetune.fold``) and scored on the same held-out images with the same evaluation view and
normalisation (``finetune.eval_crop_pct``, ``finetune.mean/std``) as the classifiers. Writes
``metrics/baselines.json``; the report shows it beside the models and the claims compare the best
model with it. Deterministic: no seed enters.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader

from components.data.sources import ImageListDataset
from components.data.splits import read_labeled_indices, split_digest
from components.evaluation.baselines import flatten_pixels, pixel_baselines
from components.training.finetune import finetune_transforms
from pipelines import layout
from pipelines.common import StageContext, classification_index, run_stage

log = logging.getLogger("mimflow.baselines")


def pixels(items: list, transform, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for images, labels in DataLoader(ImageListDataset(items, transform), batch_size=batch_size):
        xs.append(flatten_pixels(images))
        ys.append(torch.as_tensor(labels))
    return torch.cat(xs), torch.cat(ys)


def baselines(ctx: StageContext) -> dict:
    """Logistic regression and k-NN on raw pixels: finetune's labeled split -> the held-out images."""
    ft = ctx.params.finetune
    index = classification_index(ctx)
    split = layout.existing_labeled_split(ctx, "finetune", ft.labeled_percent, ft.fold)
    labeled = read_labeled_indices(ctx.root / split, len(index.train))
    _, eval_tf = finetune_transforms(
        index.image_size, None, 0.0, tuple(ft.crop_scale), tuple(ft.mean), tuple(ft.std), eval_crop_pct=ft.eval_crop_pct
    )
    t = time.perf_counter()
    train_x, train_y = pixels([index.train[i] for i in labeled], eval_tf)
    val_x, val_y = pixels(index.val, eval_tf)
    res = pixel_baselines(
        train_x, train_y, val_x, val_y, len(index.classes), k=ft.knn.k, temperature=ft.knn.temperature
    )
    info = res.pop("logistic")
    if not info["converged"]:
        log.warning(
            "logistic regression stopped at gradient %.2e after %d iterations", info["grad_max"], info["iterations"]
        )
    log.info(
        "raw pixels: logistic %.1f %%, k-NN %.1f %% (%d labeled, %d held-out)",
        res["logistic_top1"],
        res["knn_top1"],
        len(labeled),
        len(index.val),
    )
    return {
        **res,
        "logistic_iterations": info["iterations"],
        "logistic_converged": info["converged"],
        "logistic_l2": info["l2"],
        "features": int(train_x.shape[1]),
        "labeled_images": len(labeled),
        "val_images": len(index.val),
        "classes": len(index.classes),
        "split": str(split),
        "split_digest": split_digest(labeled),
        "fit_s": round(time.perf_counter() - t, 2),
    }


if __name__ == "__main__":
    run_stage("baselines", baselines)
