"""Semi-supervised splits, following Soft Teacher (Xu et al. 2021, Sec. 4.1 "Datasets").

For a labeled percent P and fold k, round(P % of N) images (at least one) are sampled without
replacement with a seed fixed per fold; the remaining images form the unlabeled set, whose annotations
are dropped. A fold draws one permutation of the sorted ids from ``default_rng([seed, fold])`` and
takes its first images, so within a fold the splits are nested (1 % within 5 % within 10 %), which makes
differences between percents less noisy; different folds draw different permutations.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from components.data.sources import DataError
from components.io import read_json


def num_labeled(n: int, percent: float) -> int:
    """round(percent % of n), half up, and at least 1 (for n >= 1)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    return min(n, max(1, int(math.floor(n * percent / 100.0 + 0.5)))) if n else 0


def labeled_split(image_ids, percent: float, fold: int, seed: int) -> tuple[list, list]:
    """(labeled ids, unlabeled ids), both sorted; deterministic in (seed, percent, fold), independent of input order."""
    ids = sorted(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("labeled_split: image ids must be unique")
    if not ids:
        raise ValueError("labeled_split: no images to split")
    k = num_labeled(len(ids), percent)
    order = np.random.default_rng([int(seed), int(fold)]).permutation(len(ids))
    chosen = set(order[:k].tolist())
    labeled = [ids[i] for i in range(len(ids)) if i in chosen]
    unlabeled = [ids[i] for i in range(len(ids)) if i not in chosen]
    return labeled, unlabeled


def split_coco(coco: dict, labeled_ids) -> tuple[dict, dict]:
    """(labeled COCO with its annotations, unlabeled COCO with the other images and ``annotations: []``)."""
    labeled_ids = set(labeled_ids)
    known = {im["id"] for im in coco["images"]}
    unknown = labeled_ids - known
    if unknown:
        raise ValueError(f"split_coco: labeled ids not in the COCO images: {sorted(unknown)[:5]}")
    rest = {k: copy.deepcopy(v) for k, v in coco.items() if k not in ("images", "annotations")}
    labeled = {
        **copy.deepcopy(rest),
        "images": [dict(im) for im in coco["images"] if im["id"] in labeled_ids],
        "annotations": [dict(a) for a in coco.get("annotations", []) if a["image_id"] in labeled_ids],
    }
    unlabeled = {
        **copy.deepcopy(rest),
        "images": [dict(im) for im in coco["images"] if im["id"] not in labeled_ids],
        "annotations": [],
    }
    return labeled, unlabeled


def read_labeled_indices(path: str | os.PathLike, num_train: int) -> list[int]:
    """The ``labeled`` indices of ``splits/labeled_<pct>_fold<k>.json``, checked against ``num_train`` images."""
    path = Path(path)
    try:
        split = read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    if not isinstance(split, dict) or "labeled" not in split or not isinstance(split["labeled"], list):
        raise DataError(f"{path}: missing key 'labeled' (a list of indices into train)")
    idx = split["labeled"]
    for i, v in enumerate(idx):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_train:
            raise DataError(f"{path}: labeled[{i}] = {v!r} is not an index in 0..{num_train - 1}")
    if len(set(idx)) != len(idx):
        raise DataError(f"{path}: 'labeled' has duplicate indices")
    if not idx:
        raise DataError(f"{path}: 'labeled' is empty")
    return idx


def split_digest(indices: list[int]) -> str:
    """A short digest of a labeled split's indices: two stages that record the same one used one split."""
    return hashlib.sha256(json.dumps(sorted(int(i) for i in indices)).encode()).hexdigest()[:16]
