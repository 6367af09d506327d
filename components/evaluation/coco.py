"""COCO box evaluation with pycocotools, and a figure of predictions against ground truth.

Soft Teacher reports COCO mAP@[.5:.95] on val2017 (Xu et al. 2021, Sec. 4.1); we report the same
``COCOeval`` summary (AP, AP50, AP75, AP small/medium/large) on the held-out scenes. Detections are
torchvision outputs (xyxy boxes, contiguous labels 1..C) mapped back to COCO category ids.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AREA_RANGES = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, float("inf"))}  # COCOeval's, bounds inclusive


def coco_api(coco: dict) -> COCO:
    """A pycocotools COCO index over an in-memory instances dict (no printing). Annotation ids are
    renumbered 1..N: COCOeval records a match by the ground truth's id and reads id 0 as "unmatched",
    so a box with id 0 (valid COCO) could never be found. Results never refer to annotation ids."""
    api = COCO()
    api.dataset = {
        "images": coco["images"],
        "annotations": [{**a, "id": i} for i, a in enumerate(coco["annotations"], start=1)],
        "categories": coco["categories"],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def to_coco_results(detections: Iterable[dict], label_to_category: list[int]) -> list[dict]:
    """torchvision detections ({"image_id", "boxes" xyxy, "scores", "labels" 1..C}) -> COCO results."""
    results = []
    for det in detections:
        boxes = det["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            results.append(
                {
                    "image_id": int(det["image_id"]),
                    "category_id": int(label_to_category[label - 1]),
                    "bbox": box,
                    "score": float(score),
                }
            )
    return results


def coco_evaluate(coco: dict, results: list[dict]) -> dict[str, float | None]:
    """COCOeval (bbox) of COCO-format ``results`` against the ground truth ``coco``: AP, AP50, AP75,
    APs, APm, APl in [0, 1], or None where there is nothing to find (pycocotools' -1: no ground-truth
    box in that size range). No detections at all give 0 (pycocotools cannot load an empty list)."""
    if not results:
        areas = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"] if not a.get("iscrowd", 0)]

        def found(key: str) -> bool:
            lo, hi = AREA_RANGES.get(key, (0, float("inf")))
            return any(lo <= area <= hi for area in areas)

        return {k: 0.0 if found(k) else None for k in AP_KEYS}
    gt = coco_api(coco)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: None if v < 0 else float(v) for k, v in zip(AP_KEYS, ev.stats[:6])}


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: Iterable[tuple[int, torch.Tensor]], device: torch.device, batch_size: int = 8
) -> list[dict]:
    """Run a torchvision detector (eval mode) over (image_id, image [3, H, W] in [0, 1]) pairs."""
    was_training = model.training
    model.eval()
    out, batch = [], []

    def flush() -> None:
        dets = model([img.to(device) for _, img in batch])
        out.extend({"image_id": i, **{k: v.cpu() for k, v in d.items()}} for (i, _), d in zip(batch, dets))
        batch.clear()

    for item in images:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    return out


def prediction_figure(
    images: list[torch.Tensor],
    truths: list[dict],
    detections: list[dict],
    class_names: list[str],
    score_threshold: float = 0.5,
    title: str = "",
):
    """A matplotlib figure: each held-out image with ground truth (dashed green) and detections above
    ``score_threshold`` (solid, labelled with class and score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, gt, det in zip(axes.flat, images, truths, detections):
        ax.imshow(np.clip(img.permute(1, 2, 0).cpu().numpy(), 0, 1))
        for x1, y1, x2, y2 in gt["boxes"].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.2, ls="--"))
        for (x1, y1, x2, y2), lab, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            if s < score_threshold:
                continue
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
            ax.text(
                x1,
                y1,
                f"{class_names[lab - 1]} {s:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox=dict(fc="red", ec="none", pad=0.5, alpha=0.8),
            )
    fig.suptitle(title or "held-out scenes: ground truth (green, dashed) vs detections (red)", fontsize=9)
    fig.tight_layout()
    return fig
