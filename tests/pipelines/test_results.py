"""The stage's results split for `dvc metrics`: numbers in metrics/, timings and strings in runs/ (issue 30, item 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.results import info_path, merge_results, read_results, split_results, write_results

DETECT = {
    "method": "softteacher",
    "percent": 10.0,
    "seed": 0,
    "class_agnostic": True,
    "steps": 400,
    "AP": 0.35,
    "teacher": {"AP": 0.35, "APl": None},
    "student": {"AP": 0.4, "APl": None},
    "split": "data/detection/splits/10_fold0",
    "models": {"mae": {"path": "models/pretrain_mae", "mean": [0.5, 0.5, 0.5]}},
    "skipped": {},
    "train_s": 154.07,
    "eval_s": 3.11,
    "train_images_per_s": 45.16,
    "images_per_s": 140.0,
    "resumed_from_step": None,
    "wall_time_s": 159.68,
}


def leaves(d):
    for v in d.values():
        yield from leaves(v) if isinstance(v, dict) else [v]


def test_metrics_hold_numbers_only_and_the_run_info_the_rest():
    metrics, info = split_results(DETECT)
    assert metrics == {
        "percent": 10.0,
        "seed": 0,
        "steps": 400,
        "AP": 0.35,
        "teacher": {"AP": 0.35, "APl": None},
        "student": {"AP": 0.4, "APl": None},
    }
    assert all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in leaves(metrics))
    assert set(info) == {
        "method",
        "class_agnostic",
        "split",
        "models",
        "skipped",
        "train_s",
        "eval_s",
        "train_images_per_s",
        "images_per_s",
        "resumed_from_step",
        "wall_time_s",
    }
    assert merge_results(metrics, info) == DETECT


def test_non_finite_numbers_stay_out_of_the_metrics():
    metrics, info = split_results({"loss": float("nan"), "top1": 1.0})
    assert metrics == {"top1": 1.0} and math.isnan(info["loss"])


def test_info_path_mirrors_the_metrics_path():
    assert info_path(Path("metrics/finetune/mae-0.json")) == Path("runs/finetune/mae-0.json")
    assert info_path(Path("/p/metrics/x/metrics/cka.json")) == Path("/p/metrics/x/runs/cka.json")
    with pytest.raises(ValueError, match="not under a metrics/"):
        info_path(Path("reports/claims.json"))


def test_write_then_read_gives_the_stage_its_results_back(tmp_path):
    path = tmp_path / "metrics" / "detect" / "softteacher-10-0.json"
    write_results(path, DETECT)
    assert json.loads(path.read_text())["AP"] == 0.35 and "train_s" not in json.loads(path.read_text())
    assert json.loads((tmp_path / "runs" / "detect" / "softteacher-10-0.json").read_text())["train_s"] == 154.07
    assert read_results(path) == DETECT
    old = tmp_path / "metrics" / "cka.json"  # a metrics file from before the split: read as it is
    old.write_text(json.dumps({"kernel": "linear", "mean": 0.5}))
    assert read_results(old) == {"kernel": "linear", "mean": 0.5}
    with pytest.raises(FileNotFoundError, match="prepare.json: metrics file not found"):
        read_results(tmp_path / "metrics" / "prepare.json")
    old.write_text("[1]")
    with pytest.raises(ValueError, match="cka.json: expected a JSON object"):
        read_results(old)
