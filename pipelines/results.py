"""A stage's results as two files: ``metrics/<stage>.json`` holds the numeric results only, for
``dvc metrics show`` and ``dvc exp show --only-changed``; ``runs/<stage>.json`` (a plain ``cache: false``
out, not a DVC metric) holds what describes the run: timings (``*_s``, ``*_per_s``), strings (init, method,
split and model paths), flags and lists. ``read_results`` merges the two back into the dict the stage
returned, so readers (report, claims, README results, benchmarks) see every field as before.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from components.io import write_json

METRICS_DIR, INFO_DIR = "metrics", "runs"
TIMING = re.compile(r"(^|_)(s|ms|per_s|seconds)$|^wall_time")  # train_s, images_per_s, eval_ms, wall_time_s
RUN_FACTS = {"resumed_from_step"}  # how the run went, not what it found


def is_result(key: str, value: Any) -> bool:
    """A numeric result: an int or float (``None``: a number that is undefined, e.g. AP of an absent size) whose
    key is not a timing or a fact about the run."""
    if TIMING.search(key) or key in RUN_FACTS:
        return False
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def split_results(results: dict) -> tuple[dict, dict]:
    """``results`` as (numeric results, run info), nested mappings split key by key; a mapping that ends up
    empty on one side is left out of that side (an empty one in ``results`` goes to the run info)."""
    metrics: dict = {}
    info: dict = {}
    for key, value in results.items():
        if isinstance(value, dict) and value:
            m, i = split_results(value)
            if m:
                metrics[key] = m
            if i:
                info[key] = i
        elif isinstance(value, float) and not math.isfinite(value):
            info[key] = value  # NaN and inf are not JSON numbers for DVC; the run info keeps them
        elif is_result(str(key), value):
            metrics[key] = value
        else:
            info[key] = value
    return metrics, info


def merge_results(metrics: dict, info: dict) -> dict:
    """The inverse of :func:`split_results` (up to key order: the numbers first)."""
    merged = dict(metrics)
    for key, value in info.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_results(merged[key], value)
        else:
            merged[key] = value
    return merged


def info_path(metrics_path: Path) -> Path:
    """``.../metrics/finetune/mae-0.json`` -> ``.../runs/finetune/mae-0.json``."""
    parts = metrics_path.parts
    if METRICS_DIR not in parts[:-1]:
        raise ValueError(f"{metrics_path}: not under a {METRICS_DIR}/ directory")
    i = len(parts) - 2 - parts[-2::-1].index(METRICS_DIR)
    return Path(*parts[:i], INFO_DIR, *parts[i + 1 :])


def write_results(metrics_path: Path, results: dict) -> None:
    """Write ``results`` split: the numbers to ``metrics_path``, the rest to its :func:`info_path` (atomically)."""
    metrics, info = split_results(results)
    write_json(metrics_path, metrics)
    write_json(info_path(metrics_path), info)


def read_results(metrics_path: Path) -> dict:
    """A stage's results as it returned them: its metrics file merged with its run info (when there is one).
    A missing metrics file is ``FileNotFoundError``, bad JSON a ``ValueError``, each naming the file."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: metrics file not found (run the stage that writes it)")
    metrics = _read_object(metrics_path)
    info = info_path(metrics_path) if METRICS_DIR in metrics_path.parts[:-1] else None
    return merge_results(metrics, _read_object(info)) if info is not None and info.is_file() else metrics


def _read_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
