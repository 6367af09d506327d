"""Schedules that adapt to the data, on real images: scikit-learn's digits (1,437
training and 360 held-out images, 10 % = 144 labeled), with params.yaml's CPU default recipe and the step
floor a small labeled set wants (``finetune.min_steps: 500``; the default's 200 is sized for the shapes'
three seeds, and on digits it leaves the scratch ViT 10 points below its own probe: benchmarks/real_data.md).

At 144 labels and batch 32 an epoch is 4 steps, so finetune's 15 epochs would be 60 steps; the floor
stretches them to 125 epochs. With it the scratch ViT fine-tunes to at least the linear probe of its own
random init, and the CNN's training loss falls below 1.0 (chance is ln 10 = 2.30; label smoothing 0.1
keeps it above about 0.5)."""

from __future__ import annotations

import csv

import pytest
import yaml

from benchmarks.real_data import digits_params, export_digits
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, REPO, make_project, run

pytest.importorskip("sklearn", reason="scikit-learn is a dev dependency (pyproject [dev])")


@pytest.mark.integration  # about 3 minutes on 2 shared cores: prepare + two fine-tunes of 500 steps
@pytest.mark.timeout(1800)
def test_on_digits_scratch_vit_reaches_its_own_probe_and_the_cnn_converges(tmp_path):
    root = make_project(tmp_path / "p", params=REPO / "params.yaml")
    export_digits(root / "datasets" / "digits")
    params = digits_params(flips=False, threads=None, holdout=0.0, min_steps=500)  # the floor alone, no early stop
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, str(BIN / "python"), "-m", "pipelines.prepare")
    for init in ("scratch", "cnn"):
        run(root, str(BIN / "python"), "-m", "pipelines.finetune", "--init", init)

    scratch = read_results(root / "metrics" / "finetune" / "scratch-0.json")
    assert scratch["labeled_images"] == 144 and scratch["steps"] == 500 and scratch["epochs"] == 125
    assert scratch["top1"] >= scratch["linear_probe_top1"], scratch
    cnn = read_results(root / "metrics" / "finetune" / "cnn-0.json")
    train = list(csv.DictReader((root / "plots" / "finetune" / "cnn-0" / "train.csv").open()))
    assert len(train) == 125 and float(train[-1]["train_loss"]) < 1.0, train[-1]
    assert cnn["top1"] > 50.0, cnn
