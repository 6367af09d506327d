"""The pretrain_ibot stage: through `dvc repro` on the micro params, its params and data errors,
resuming after a kill, and DDP (centres all-reduced) against one process with the whole batch."""

from __future__ import annotations

import math
import shutil

import mlflow
import pytest
import torch
import yaml

from components.io import load_safetensors, read_json, torch_load
from components.models.ibot import create_ibot_pair
from components.models.vit import load_encoder
from components.training.optim import param_groups
from pipelines.config import ParamsError, validate_params
from pipelines.results import read_results
from tests.pipelines.conftest import (
    BIN,
    dvc_repro,
    kill_at_first_checkpoint,
    make_project,
    merge_overrides,
    micro_config,
    micro_params,
    run,
)

STAGE = "pretrain_ibot"


def _copy_with_data(project, dest, **overrides):
    """A fresh project with the micro params (``overrides`` merged into pretrain_ibot) and the fixture's data."""
    root = make_project(dest)
    shutil.copytree(project / "data" / "classification", root / "data" / "classification")
    if overrides:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params = merge_overrides(params, {STAGE: overrides})
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _encoder(root):
    return load_safetensors(root / "models" / STAGE / "encoder.safetensors")


def _networks(cfg):
    """The stage's student and teacher: the one-call builder with pretrain_ibot's head and drop path."""
    return create_ibot_pair(cfg.model.spec(), **cfg.head.model_dump(), drop_path=cfg.drop_path)


def _metrics(root):
    return read_results(root / "metrics" / f"{STAGE}.json")


def test_the_networks_learn_their_position_embedding_and_decay_their_tokens_as_ibot_does():
    """iBOT's ViT (DINO's ``vision_transformer.py``) learns its position embedding from a truncated-normal
    init (std 0.02), and ``utils.get_params_groups`` exempts only biases and 1-D tensors from weight decay:
    the [CLS] token, the position embedding and the mask embedding are decayed."""
    cfg = micro_config().pretrain_ibot
    student, teacher = _networks(cfg)
    pos = student.encoder.pos_embed
    assert (
        pos.requires_grad
        and not teacher.encoder.pos_embed.requires_grad
        and torch.equal(pos, teacher.encoder.pos_embed)
    )
    assert float(pos.detach().std()) < 0.05  # not the sin-cos table (std ~0.5)
    decayed = {n for g in param_groups(student, cfg.weight_decay) if g["weight_decay"] > 0 for n in g["names"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "masked_embed"} <= decayed
    assert not any(n.endswith(".bias") or student.get_parameter(n).ndim == 1 for n in decayed)


def test_stage_through_dvc_repro_writes_teacher_weights_metrics_figure_and_mlflow_run(project):
    dvc_repro(project, STAGE)
    cfg = micro_config().pretrain_ibot
    out = project / "models" / STAGE
    encoder, spec = load_encoder(out)  # the shared format every later stage loads
    assert spec == cfg.model.spec()
    meta = read_json(out / "encoder.json")
    assert meta["source"] == STAGE and meta["mean"] == list(cfg.mean) and meta["std"] == list(cfg.std)
    # the saved encoder is the EMA teacher of the last checkpoint, not the student
    ckpt = torch_load(project / "checkpoints" / STAGE / "last.pt")
    teacher = {k.removeprefix("encoder."): v for k, v in ckpt["extra"]["teacher"].items() if k.startswith("encoder.")}
    student = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    saved = _encoder(project)
    assert all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])
    assert ckpt["extra"]["ibot_loss"]["center"].abs().sum() > 0  # the centres are checkpointed
    # weight decay followed utils.cosine_scheduler towards weight_decay_end on the decaying groups only:
    # the last of T steps sets final + (base - final) * 0.5 * (1 + cos(pi * (T - 1) / T))
    groups = ckpt["optimizer"]["param_groups"]
    T = cfg.epochs * (8 * 12 // cfg.batch_size)
    last_wd = cfg.weight_decay_end + (cfg.weight_decay - cfg.weight_decay_end) * 0.5 * (
        1 + math.cos(math.pi * (T - 1) / T)
    )
    assert {round(g["weight_decay"], 6) for g in groups} == {0.0, round(last_wd, 6)}
    # AdamW's step counts: the head's last layer was frozen for freeze_last_layer_epochs, the rest trained every step
    student_net, _ = _networks(cfg)
    names = [n for g in param_groups(student_net, cfg.weight_decay) for n in g["names"]]
    updates = {names[i]: int(st["step"]) for i, st in ckpt["optimizer"]["state"].items()}
    steps = cfg.epochs * (8 * 12 // cfg.batch_size)
    assert (
        updates["head.last_layer.parametrizations.weight.original1"]
        == steps - cfg.freeze_last_layer_epochs * steps // cfg.epochs
    )
    assert updates["encoder.blocks.0.attn.qkv.weight"] == updates["masked_embed"] == steps

    metrics = _metrics(project)
    assert metrics["steps"] == steps and metrics["batch"] == cfg.batch_size
    for key in ("loss", "loss_cls", "loss_mim", "teacher_entropy", "teacher_kl"):
        assert math.isfinite(metrics[key]), key
    assert metrics["loss"] == pytest.approx(metrics["loss_cls"] + metrics["loss_mim"], abs=1e-4)
    assert 0 <= metrics["knn_top1"] <= 100 and metrics["knn_chance"] == 12.5 and metrics["images_per_s"] > 0
    rows = (project / "plots" / STAGE / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,loss_cls,loss_mim,lr,teacher_entropy,teacher_kl,teacher_temp"
    assert int(rows[-1].split(",")[0]) == steps and len(rows) - 1 == steps // cfg.log_every
    png = project / "plots" / STAGE / "attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert STAGE in yaml.safe_load((project / "dvc.lock").read_text())["stages"]

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["mimflow"], filter_string=f"tags.stage = '{STAGE}'", output_format="list"
    )
    assert runs, "no MLflow run for pretrain_ibot"
    last = runs[0]
    assert last.data.metrics["knn_top1"] == pytest.approx(metrics["knn_top1"])
    # the run table shows the summary, not the last point of a per-step series of the same name
    assert last.data.params["peak_lr"] == str(metrics["peak_lr"]) and last.data.metrics["lr"] < metrics["peak_lr"]
    assert last.data.params["pretrain_ibot.momentum_teacher"] == str(cfg.momentum_teacher)
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(last.info.run_id, "loss_mim")  # the per-step series, then the result at its end
    assert sorted({m.step for m in curve}) == [int(r.split(",")[0]) for r in rows[1:]]
    assert last.data.metrics["loss_mim"] == pytest.approx(metrics["loss_mim"])
    # k-NN during training (knn.every_epochs: 1: at the end of every epoch but the last) and at the end
    knn_curve = {m.step: m.value for m in client.get_metric_history(last.info.run_id, "knn_top1") if m.step > 0}
    assert sorted(knn_curve) == [steps * (e + 1) // cfg.epochs for e in range(cfg.epochs)]
    assert knn_curve[steps] == pytest.approx(metrics["knn_top1"])
    assert "figures/attention.png" in {a.path for a in client.list_artifacts(last.info.run_id, "figures")}


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("head", {"out_dim": 32, "patch_out_dim": 64}, "pretrain_ibot.head.patch_out_dim = 64"),
        ("multicrop", {"local_size": 10}, "pretrain_ibot.multicrop.local_size = 10"),
        ("multicrop", {"local_scale": [0.3, 0.1]}, "pretrain_ibot.multicrop.local_scale = [0.3, 0.1]"),
        (
            "multicrop",
            {"color_jitter": [0.4, 0.4, 0.2, 0.7]},
            "pretrain_ibot.multicrop.color_jitter = [0.4, 0.4, 0.2, 0.7]",
        ),
        ("multicrop", {"grayscale_p": 1.5}, "pretrain_ibot.multicrop.grayscale_p = 1.5"),
        ("masking", {"ratio": [0.2, 1.0]}, "pretrain_ibot.masking.ratio = [0.2, 1.0]"),
        ("masking", {"prob": 1.5}, "pretrain_ibot.masking.prob = 1.5"),
        ("loss", {"teacher_temp": 0}, "pretrain_ibot.loss.teacher_temp = 0"),
        ("weight_decay", 0, "pretrain_ibot.weight_decay = 0"),
        ("warmup_epochs", 5, "pretrain_ibot.warmup_epochs = 5"),
        ("momentum_teacher", 1.2, "pretrain_ibot.momentum_teacher = 1.2"),
        ("knn", {"crop_pct": 1.5}, "pretrain_ibot.knn.crop_pct = 1.5"),
    ],
)
def test_bad_params_are_one_line_naming_the_key(key, value, expected):
    raw = micro_params()
    raw[STAGE][key] = {**raw[STAGE].get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ParamsError) as e:
        validate_params(raw, "params.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_params_and_a_missing_split_stop_the_stage_before_writing(tmp_path, project):
    dvc_repro(project, "prepare")
    root = _copy_with_data(project, tmp_path / "params", multicrop={"local_size": 10})
    proc = run(root, str(BIN / "python"), "-m", f"pipelines.{STAGE}", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {STAGE}: params.yaml: pretrain_ibot.multicrop.local_size = 10"), last

    root = _copy_with_data(project, tmp_path / "split", knn={"labeled_percent": 30})
    proc = run(root, str(BIN / "python"), "-m", f"pipelines.{STAGE}", check=False)
    assert proc.returncode == 2  # a split prepare does not write: caught with the params, before anything is read
    last = proc.stderr.strip().splitlines()[-1]
    assert "pretrain_ibot.knn.labeled_percent = 30.0: must be one of prepare.classification" in last, last
    assert not (root / "models").exists() and not (root / "metrics").exists()


def test_a_killed_run_resumes_to_the_teacher_of_an_uninterrupted_run(tmp_path, project):
    dvc_repro(project, STAGE)  # the uninterrupted reference (up to date after the first test)
    root = _copy_with_data(project, tmp_path / "kill")
    kill_at_first_checkpoint(root, STAGE)
    assert not (root / "metrics" / f"{STAGE}.json").exists(), "the run ended before it could be killed"
    run(root, str(BIN / "python"), "-m", f"pipelines.{STAGE}")
    metrics, reference = _metrics(root), _metrics(project)
    assert metrics["resumed_from_step"] is not None and 0 < metrics["resumed_from_step"] < metrics["steps"]
    ref, resumed = _encoder(project), _encoder(root)
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)  # teacher, centres and RNG state all restored
    for key in ("loss", "loss_cls", "loss_mim", "knn_top1", "teacher_kl"):
        assert metrics[key] == reference[key], key


def test_two_processes_match_one_process_with_the_whole_batch(tmp_path, project):
    """torchrun x 2 with half the batch each = one process with the whole batch: gradients are averaged
    by DDP, the centres are all-reduced, the teacher follows the same student (drop path off in both,
    its per-process draws are the one thing that would differ)."""
    dvc_repro(project, "prepare")
    batch = micro_config().pretrain_ibot.batch_size
    single = _copy_with_data(project, tmp_path / "single", drop_path=0.0)
    run(single, str(BIN / "python"), "-m", f"pipelines.{STAGE}")
    ddp = _copy_with_data(project, tmp_path / "ddp", drop_path=0.0, batch_size=batch // 2)
    run(ddp, str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", f"pipelines.{STAGE}")
    m1, m2 = _metrics(single), _metrics(ddp)
    assert m2["batch"] == m1["batch"] == batch and m2["steps"] == m1["steps"] and m2["peak_lr"] == m1["peak_lr"]
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-3)
    c1 = torch_load(single / "checkpoints" / STAGE / "last.pt")["extra"]["ibot_loss"]
    c2 = torch_load(ddp / "checkpoints" / STAGE / "last.pt")["extra"]["ibot_loss"]
    for key in ("center", "center2"):
        assert float((c1[key] - c2[key]).abs().max()) < 1e-4, key
    e1, e2 = _encoder(single), _encoder(ddp)
    assert max(float((e1[k] - e2[k]).abs().max()) for k in e1) < 1e-4
