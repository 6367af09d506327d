"""The finetune@{scratch,mae,ibot,cnn}-<seed> matrix through `dvc repro` on the micro params, and its error path."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from components.data.sources import load_classification_index
from components.io import load_safetensors
from components.models.classifier import load_classifier, read_classifier_meta
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, dvc_repro, micro_config, run

INITS = ("scratch", "mae", "ibot", "cnn")


def test_each_init_through_dvc_repro_writes_metrics_and_weights(project, monkeypatch):
    dvc_repro(project, "finetune")
    params = yaml.safe_load((project / "params.yaml").read_text())["finetune"]
    index = load_classification_index(project / "data" / "classification" / "index.json")
    x = torch.randn(2, 3, index.image_size, index.image_size)
    seeds = params["seeds"]
    assert len(seeds) == 2
    runs = [f"{init}-{seed}" for init in INITS for seed in seeds]
    for run_name in runs:
        init, seed = run_name.rsplit("-", 1)
        m = read_results(project / "metrics" / "finetune" / f"{run_name}.json")
        assert m["init"] == init and m["seed"] == int(seed)
        assert m["labeled_images"] == 48 and m["val_images"] == len(index.val)
        assert 0 <= m["top1"] <= m["top5"] <= 100 and 1 <= m["best_epoch"] <= params["epochs"]
        frozen = {"knn_top1", "linear_probe_top1"}
        assert frozen <= m.keys() if init != "cnn" else not frozen & m.keys()
        # weights for cka: the JSON names the architecture and the classes, and they load strictly
        d = project / "models" / "finetune" / run_name
        meta = read_classifier_meta(d)
        assert meta["arch"] == ("vit" if init != "cnn" else params["cnn"]["arch"]) and meta["classes"] == index.classes
        model = load_classifier(d)
        assert model(x).shape == (2, len(index.classes))
        # curves for dvc plots and the confusion figure
        plots = project / "plots" / "finetune" / run_name
        train = list(csv.DictReader((plots / "train.csv").open()))
        val = list(csv.DictReader((plots / "val.csv").open()))
        assert [int(r["epoch"]) for r in train] == list(range(1, params["epochs"] + 1))
        assert int(val[-1]["epoch"]) == params["epochs"] and float(val[-1]["val_top1"]) == m["top1"]
        assert len(list(csv.DictReader((plots / "predictions.csv").open()))) == len(index.val)
        assert (plots / "confusion.png").stat().st_size > 1000
    # a pretrained init really started from its encoder: with the pretrained weights loaded back, the
    # fine-tuned patch embedding is closer to them than the scratch model's
    enc = load_safetensors(project / "models" / "pretrain_mae" / "encoder.safetensors")["patch_embed.proj.weight"]
    finetuned = project / "models" / "finetune"
    mae = load_safetensors(finetuned / "mae-0" / "model.safetensors")["patch_embed.proj.weight"]
    scratch = load_safetensors(finetuned / "scratch-0" / "model.safetensors")["patch_embed.proj.weight"]
    if enc.shape == scratch.shape:
        assert (mae - enc).norm() < (scratch - enc).norm()
    # MLflow: every classifier registered, the alias on a version, logged with its signature
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for init in INITS:
        version = client.get_model_version_by_alias(f"mimflow-finetune-{init}", "best")
        tags = client.get_run(version.run_id).data.tags
        assert tags["mimflow.stage"] == f"finetune@{init}-{tags['seed']}" and int(tags["seed"]) in seeds
        signature = mlflow.models.get_model_info(f"models:/mimflow-finetune-{init}@best").signature
        assert tuple(signature.inputs.inputs[0].shape) == (-1, 3, index.image_size, index.image_size), signature
        assert tuple(signature.outputs.inputs[0].shape) == (-1, len(index.classes)), signature
    # one run per seed: the seed changes the run (head init, data order), the labeled split stays prepare's
    for init in INITS:
        a, b = (read_results(project / "metrics" / "finetune" / f"{init}-{s}.json") for s in seeds)
        assert a["split_digest"] == b["split_digest"]
        w0, w1 = (
            load_safetensors(project / "models" / "finetune" / f"{init}-{s}" / "model.safetensors") for s in seeds
        )
        assert any(not torch.equal(w0[k], w1[k]) for k in w0), f"{init}: seeds {seeds} trained the same weights"
    # the MAE init's run records the pretrain_mae params it depends on; its series share one axis (epochs)
    run = client.get_run(client.get_model_version_by_alias("mimflow-finetune-mae", "best").run_id)
    assert run.data.params["pretrain_mae.mask_ratio"] == str(micro_config().pretrain_mae.mask_ratio)
    assert run.data.params["epochs"] == str(params["epochs"])
    steps = {k: {m.step for m in client.get_metric_history(run.info.run_id, k)} for k in ("epoch_train_loss", "top1")}
    assert steps["epoch_train_loss"] == set(range(1, params["epochs"] + 1)) and steps["top1"] == {params["epochs"]}
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "val_top1")) <= params["epochs"]
    # nothing changed: nothing re-runs
    out = dvc_repro(project, "finetune").stdout
    assert "Running stage 'finetune@" not in out


def test_a_labeled_percent_without_split_is_a_one_line_error(project):
    dvc_repro(project, "prepare")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["labeled_percent"] = 30
    (project / "bad.params.yaml").write_text(yaml.safe_dump(params))
    proc = run(
        project,
        str(BIN / "python"),
        "-m",
        "pipelines.finetune",
        "--params",
        "bad.params.yaml",
        "--init",
        "cnn",
        check=False,
    )
    assert proc.returncode == 2  # a split prepare does not write: caught with the params, before anything is read
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: finetune@cnn: "), last  # params fail before the seed is read
    assert "finetune.labeled_percent = 30.0: must be one of prepare.classification.labeled_percents" in last, last


def test_an_odd_batch_with_mixing_is_a_params_error():
    """timm's batch Mixup pairs each image with the batch's reverse; an odd batch is caught in params."""
    from pipelines.config import ParamsError, validate_params
    from tests.pipelines.conftest import micro_params

    raw = micro_params()
    raw["finetune"]["batch_size"] = 15
    with pytest.raises(ParamsError, match=r"finetune.batch_size = 15: must be even when mixup or cutmix > 0"):
        validate_params(raw, "params.yaml")
    raw["finetune"].update(mixup=0, cutmix=0)
    validate_params(raw, "params.yaml")


@pytest.mark.parametrize("section, key", [("finetune", "eval_crop_pct"), ("cka", "crop_pct")])
def test_an_eval_crop_outside_0_1_is_a_params_error(section, key):
    from pipelines.config import ParamsError, validate_params
    from tests.pipelines.conftest import micro_params

    raw = micro_params()
    raw[section][key] = 1.2
    with pytest.raises(ParamsError, match=rf"{section}.{key} = 1.2"):
        validate_params(raw, "params.yaml")


@pytest.mark.integration  # ~30 s on 2 shared cores: prepare + one scratch fine-tune of the micro params
def test_early_stopping_trains_without_the_held_out_labels_and_keeps_the_best_epoch(tmp_path):
    from components.data.splits import read_labeled_indices
    from components.training.early_stop import holdout_split
    from tests.pipelines.conftest import make_project

    root = make_project(tmp_path / "p")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    params["finetune"].update(seeds=[3], epochs=6, eval_every=1, early_stop={"holdout_fraction": 0.25, "patience": 2})
    params["finetune"]["linear_probe"]["enabled"] = params["finetune"]["knn"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, str(BIN / "python"), "-m", "pipelines.prepare")
    run(root, str(BIN / "python"), "-m", "pipelines.finetune", "--init", "scratch", "--seed", "3")

    m = read_results(root / "metrics" / "finetune" / "scratch-3.json")
    index = load_classification_index(root / "data" / "classification" / "index.json")
    labeled = read_labeled_indices(root / m["split"], len(index.train))
    _, held = holdout_split(labeled, [index.train[i][1] for i in labeled], 0.25, 3)
    assert m["labeled_images"] == 48 and m["holdout_images"] == len(held) and 8 <= len(held) <= 16  # ~25 % per class
    stop = m["early_stop"]
    steps_per_epoch = (48 - len(held)) // params["finetune"]["batch_size"]  # drop_last batches of the rest
    assert m["steps"] == m["epochs"] * steps_per_epoch and 1 <= stop["best_epoch"] <= m["epochs"] <= 6
    assert stop["stopped"] == (m["epochs"] < 6) and 0 <= stop["holdout_top1"] <= 100
    # the restored state is the best epoch's: its held-out test row is the one the metrics report
    val = {
        int(r["epoch"]): float(r["val_top1"])
        for r in csv.DictReader((root / "plots/finetune/scratch-3/val.csv").open())
    }
    assert val[stop["best_epoch"]] == m["top1"], (val, m)
