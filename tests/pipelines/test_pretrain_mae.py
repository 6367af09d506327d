"""The pretrain_mae stage: through `dvc repro` on the micro params, its params errors (the exit code
and the one-line report are the shared entry point's, tested with prepare), resuming after a kill, and
DDP + gradient accumulation against one process with the whole batch."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import torch
import yaml

from components.io import load_safetensors, read_json
from components.models.mae import MaskedAutoencoder
from components.models.vit import load_encoder
from pipelines.config import ParamsError, validate_params
from pipelines.results import read_results
from tests.pipelines.conftest import (
    BIN,
    dvc_repro,
    kill_at_first_checkpoint,
    make_project,
    micro_config,
    micro_params,
    mlflow_rest,
    run,
)


def _copy_with_data(project, dest, **overrides):
    """A fresh project with the micro params (``overrides`` into pretrain_mae), the fixture's prepared
    data, and MLflow off (a new SQLite store costs seconds of migrations and is not what these test)."""
    root = make_project(dest)
    shutil.copytree(project / "data" / "classification", root / "data" / "classification")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain_mae"].update(overrides)
    params["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _encoder(root):
    return load_safetensors(root / "models" / "pretrain_mae" / "encoder.safetensors")


def test_stage_through_dvc_repro_writes_weights_metrics_figure_and_mlflow_run(project):
    dvc_repro(project, "pretrain_mae")
    cfg = micro_config().pretrain_mae
    out = project / "models" / "pretrain_mae"
    encoder, spec = load_encoder(out)  # the shared format every later stage loads
    assert spec == cfg.model.spec()
    meta = read_json(out / "encoder.json")
    assert meta["mean"] == list(cfg.mean) and meta["std"] == list(cfg.std) and meta["source"] == "pretrain_mae"
    # the full MAE (decoder included) reloads and reproduces the encoder's weights
    mae = MaskedAutoencoder(spec, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads)
    mae.load_state_dict(load_safetensors(out / "mae.safetensors"))
    assert torch.equal(mae.encoder.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)

    metrics = read_results(project / "metrics" / "pretrain_mae.json")
    steps = cfg.epochs * (8 * 12 // cfg.batch_size)
    assert metrics["steps"] == steps and metrics["effective_batch"] == cfg.batch_size
    # what the numbers were computed on: the run's info and its MLflow params, not a DVC metric
    info = json.loads((project / "runs" / "pretrain_mae.json").read_text())
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["cpu"]
    assert "cpu_capability" not in json.loads((project / "metrics" / "pretrain_mae.json").read_text())
    assert 0 < metrics["val_masked_loss"] < 10 and 0 < metrics["train_loss"] < 10 and metrics["images_per_s"] > 0
    rows = (project / "plots" / "pretrain_mae" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and int(rows[-1].split(",")[0]) == steps
    png = project / "plots" / "pretrain_mae" / "reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "pretrain_mae" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["mimflow"], filter_string="tags.stage = 'pretrain_mae'", output_format="list"
    )
    assert runs, "no MLflow run for pretrain_mae"
    last = runs[0]
    assert last.data.metrics["val_masked_loss"] == pytest.approx(metrics["val_masked_loss"])
    assert last.data.params["pretrain_mae.mask_ratio"] == str(cfg.mask_ratio)
    history = mlflow.MlflowClient().get_metric_history(last.info.run_id, "loss")
    assert len(history) == len(rows) - 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(last.info.run_id, "figures")}
    assert "figures/reconstructions.png" in artifacts
    images = [a.path for a in mlflow.MlflowClient().list_artifacts(last.info.run_id, "images")]
    assert any(p.startswith(f"images/reconstructions+step+{steps}+") for p in images), images
    # a run named by stage and commit; constants as params; the encoder a logged model with its signature
    assert last.info.run_name.startswith("pretrain_mae · ")
    assert last.data.params["steps"] == str(steps)
    assert last.data.params["cpu_capability"] == info["cpu_capability"]
    assert "steps" not in last.data.metrics and "peak_lr" not in last.data.metrics
    with mlflow_rest(mlflow.get_tracking_uri()) as rest:  # through the REST API, as the UI lists them
        query = {"experiment_ids": [last.info.experiment_id], "filter": f"source_run_id = '{last.info.run_id}'"}
        (model,) = rest.post("/api/2.0/mlflow/logged-models/search", json=query).get_json()["models"]
    assert model["info"]["name"] == "encoder" and model["info"]["status"] == "LOGGED_MODEL_READY"
    signature = mlflow.models.get_model_info(f"models:/{model['info']['model_id']}").signature
    assert tuple(signature.inputs.inputs[0].shape) == (-1, 3, spec.img_size, spec.img_size)
    assert tuple(signature.outputs.inputs[0].shape) == (-1, spec.embed_dim)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("mask_ratio", 1.0, "pretrain_mae.mask_ratio = 1.0"),
        ("mask_ratio", 0, "pretrain_mae.mask_ratio = 0"),
        ("mask_ratio", -0.5, "pretrain_mae.mask_ratio = -0.5"),
        ("model", {"preset": "vit_micro_patch4_32", "img_size": 30}, "pretrain_mae.model.img_size = 30"),
        ("model", {"preset": "vit_micro_patch4_32", "patch_size": 5}, "pretrain_mae.model.patch_size = 5"),
        ("model", {"preset": "vit_huge_patch99"}, "pretrain_mae.model.preset = 'vit_huge_patch99'"),
        ("decoder_num_heads", 3, "pretrain_mae.decoder_embed_dim = 32"),
        ("effective_batch", 20, "pretrain_mae.effective_batch = 20"),
        ("warmup_epochs", 5, "pretrain_mae.warmup_epochs = 5"),
    ],
)
def test_bad_params_are_one_line_naming_the_key(key, value, expected):
    raw = micro_params()
    raw["pretrain_mae"][key] = value
    with pytest.raises(ParamsError) as e:
        validate_params(raw, "params.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, project):
    dvc_repro(project, "pretrain_mae")  # the uninterrupted reference (up to date after the first test)
    root = _copy_with_data(project, tmp_path / "kill")
    kill_at_first_checkpoint(root, "pretrain_mae")
    assert not (root / "metrics" / "pretrain_mae.json").exists(), "the run ended before it could be killed"
    run(root, str(BIN / "python"), "-m", "pipelines.pretrain_mae")
    metrics = read_results(root / "metrics" / "pretrain_mae.json")
    assert metrics["resumed_from_step"] is not None and 0 < metrics["resumed_from_step"] < metrics["steps"]
    reference = _encoder(project)
    resumed = _encoder(root)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert metrics["val_masked_loss"] == read_results(project / "metrics" / "pretrain_mae.json")["val_masked_loss"]


def test_two_processes_with_accumulation_match_one_process_with_the_whole_batch(tmp_path, project):
    """torchrun x 2 with batch_size B/4 and accumulation 2 = one process with batch B: the masking noise
    travels with each sample, and the loader shards the same global batch between ranks."""
    dvc_repro(project, "pretrain_mae")
    batch = micro_config().pretrain_mae.batch_size
    root = _copy_with_data(project, tmp_path / "ddp", batch_size=batch // 4, effective_batch=batch)
    run(root, str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "pipelines.pretrain_mae")
    metrics = read_results(root / "metrics" / "pretrain_mae.json")
    reference = read_results(project / "metrics" / "pretrain_mae.json")
    assert metrics["effective_batch"] == reference["effective_batch"] and metrics["steps"] == reference["steps"]
    assert metrics["val_masked_loss"] == pytest.approx(reference["val_masked_loss"], abs=1e-4)
    ref, ddp = _encoder(project), _encoder(root)
    assert max(float((ref[k] - ddp[k]).abs().max()) for k in ref) < 1e-4
