"""The GPU profile (params/gpu-vit-b16.yaml): every stage's section is its paper's recipe, the smoke
overrides (params/gpu-vit-b16.smoke.yaml) change sizes only, and the device check
(benchmarks/gpu_check.py) runs every section and the whole DAG on a CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml

from pipelines.config import load_params, validate_params
from tests.pipelines.conftest import REPO

PROFILE = REPO / "params" / "gpu-vit-b16.yaml"
SECTIONS = ("runtime", "tracking", "prepare", "pretrain_mae", "pretrain_ibot", "finetune", "detect", "cka", "report")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_profile_writes_every_stage_section():
    raw = yaml.safe_load(PROFILE.read_text())
    assert set(raw) == set(SECTIONS)
    assert "filled in" not in PROFILE.read_text()


def test_gpu_profile_is_the_papers_vit_b16_recipe():
    """MAE PRETRAIN.md (ViT-B/16, 800 epochs), the iBOT README's ViT-B/16 run, MAE FINETUNE.md, the
    MAE linear probe, Soft Teacher's configs/soft_teacher/base.py and Raghu et al.'s CKA setting."""
    params = load_params(PROFILE)
    assert params.runtime.precision == "bf16" and params.runtime.compile and params.runtime.num_workers >= 2
    assert params.prepare.classification.source == "imagefolder" and params.prepare.detection.source == "coco"
    assert params.prepare.detection.labeled_percents == [1, 5, 10]

    mae = params.pretrain_mae
    spec = mae.model.spec()
    assert (spec.img_size, spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads) == (224, 16, 768, 12, 12)
    assert (mae.decoder_embed_dim, mae.decoder_depth, mae.decoder_num_heads) == (512, 8, 16)
    assert mae.effective_batch == 4096 and mae.blr * mae.effective_batch / 256 == pytest.approx(2.4e-3)
    assert (mae.epochs, mae.warmup_epochs, mae.mask_ratio, mae.betas, mae.weight_decay) == (
        800,
        40,
        0.75,
        (0.9, 0.95),
        0.05,
    )
    assert mae.norm_pix_loss and mae.crop_scale == (0.2, 1.0)
    for gpus in (1, 2, 4, 8):  # accumulation reaches the effective batch on any of these
        assert mae.effective_batch % (mae.batch_size * gpus) == 0

    ibot = params.pretrain_ibot
    assert ibot.model.spec().embed_dim == 768 and ibot.model.spec().patch_size == 16
    head, loss, crops, masking = ibot.head, ibot.loss, ibot.multicrop, ibot.masking
    assert (head.out_dim, head.patch_out_dim, head.hidden_dim, head.bottleneck_dim, head.nlayers) == (
        8192,
        8192,
        2048,
        256,
        3,
    )
    assert head.shared_head and head.norm_last_layer
    assert (loss.student_temp, loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs) == (
        0.1,
        0.04,
        0.07,
        30,
    )
    assert (loss.warmup_teacher_patch_temp, loss.teacher_patch_temp, loss.center_momentum, loss.center_momentum2) == (
        0.04,
        0.07,
        0.9,
        0.9,
    )
    assert (crops.num_local, crops.local_size, crops.local_scale, crops.global_scale) == (
        10,
        96,
        (0.05, 0.25),
        (0.25, 1.0),
    )
    assert crops.blur_sigma == (0.1, 2.0) and crops.grayscale_p == 0.2 and crops.color_jitter_p == 0.8
    assert (masking.prob, masking.ratio) == (0.5, (0.1, 0.5))
    assert ibot.blr * ibot.batch_size * 8 / 256 == pytest.approx(2e-3) and ibot.min_lr == 1e-6
    assert (ibot.epochs, ibot.warmup_epochs, ibot.weight_decay, ibot.weight_decay_end) == (400, 10, 0.04, 0.4)
    assert (ibot.clip_grad, ibot.drop_path, ibot.momentum_teacher, ibot.freeze_last_layer_epochs) == (
        3.0,
        0.1,
        0.996,
        1,
    )
    assert ibot.knn.crop_pct == 0.875 and ibot.knn.k == 20 and ibot.knn.temperature == 0.07

    ft = params.finetune
    assert (ft.epochs, ft.warmup_epochs, ft.batch_size * 8, ft.min_lr) == (100, 5, 1024, 1e-6)
    assert (ft.vit.blr, ft.vit.layer_decay, ft.vit.drop_path, ft.vit.weight_decay, ft.vit.global_pool) == (
        5e-4,
        0.65,
        0.1,
        0.05,
        "avg",
    )
    assert (ft.mixup, ft.cutmix, ft.label_smoothing, ft.rand_augment, ft.re_prob) == (
        0.8,
        1.0,
        0.1,
        "rand-m9-mstd0.5-inc1",
        0.25,
    )
    assert ft.eval_crop_pct == 0.875 and ft.crop_scale == (0.08, 1.0)
    probe = ft.linear_probe
    assert (probe.blr, probe.epochs, probe.warmup_epochs, probe.weight_decay) == (0.1, 90, 10, 0.0)
    assert ft.cnn.arch == "resnet50" and ft.cnn.width == 64

    det = params.detect
    assert (det.model.backbone, det.model.width, det.model.min_size, det.model.max_size) == ("resnet50", 64, 800, 1333)
    assert (det.optimizer, det.lr, det.momentum, det.weight_decay, det.steps) == ("sgd", 0.01, 0.9, 1e-4, 180_000)
    assert [round(m * det.steps) for m in det.lr_milestones] == [120_000, 160_000]
    st = det.soft_teacher
    assert (st.unsup_weight, st.unlabeled_ratio, st.rpn_threshold, st.cls_threshold, st.initial_threshold) == (
        4.0,
        4,
        0.9,
        0.9,
        0.5,
    )
    assert (st.reg_uncertainty, st.jitter_times, st.jitter_scale, st.ema_momentum) == (0.02, 10, 0.06, 0.999)
    assert det.views.short_side_range == (400, 1200) and det.views.flip_p == 0.5
    assert (det.views.translate, det.views.rotate, det.views.shear, det.views.erase_n) == (0.1, 30, 30, (1, 5))
    assert det.views.colour  # the official pipeline's colour op on the labeled and strong views

    cka = params.cka
    assert (cka.kernel, cka.debiased, cka.crop_pct, cka.max_images) == ("linear", True, 0.875, 10_000)


# The knobs that make the recipe; the smoke overrides may change any other (sizes, counts, lengths).
RECIPE = [
    "runtime.precision",
    "runtime.compile",
    "prepare.on_error",
    "pretrain_mae.mask_ratio",
    "pretrain_mae.norm_pix_loss",
    "pretrain_mae.blr",
    "pretrain_mae.weight_decay",
    "pretrain_mae.betas",
    "pretrain_mae.crop_scale",
    "pretrain_mae.mean",
    "pretrain_mae.std",
    "pretrain_ibot.loss.student_temp",
    "pretrain_ibot.loss.teacher_temp",
    "pretrain_ibot.loss.teacher_patch_temp",
    "pretrain_ibot.loss.warmup_teacher_temp",
    "pretrain_ibot.loss.lambda2",
    "pretrain_ibot.masking",
    "pretrain_ibot.multicrop.num_local",
    "pretrain_ibot.multicrop.global_scale",
    "pretrain_ibot.multicrop.local_scale",
    "pretrain_ibot.multicrop.blur_sigma",
    "pretrain_ibot.multicrop.color_jitter",
    "pretrain_ibot.multicrop.grayscale_p",
    "pretrain_ibot.head.shared_head",
    "pretrain_ibot.blr",
    "pretrain_ibot.weight_decay",
    "pretrain_ibot.weight_decay_end",
    "pretrain_ibot.clip_grad",
    "pretrain_ibot.momentum_teacher",
    "pretrain_ibot.drop_path",
    "pretrain_ibot.knn.crop_pct",
    "finetune.mixup",
    "finetune.cutmix",
    "finetune.label_smoothing",
    "finetune.rand_augment",
    "finetune.re_prob",
    "finetune.crop_scale",
    "finetune.eval_crop_pct",
    "finetune.vit.layer_decay",
    "finetune.vit.blr",
    "finetune.vit.drop_path",
    "finetune.vit.global_pool",
    "finetune.cnn.arch",
    "finetune.linear_probe.blr",
    "detect.optimizer",
    "detect.lr",
    "detect.momentum",
    "detect.weight_decay",
    "detect.lr_milestones",
    "detect.soft_teacher.unsup_weight",
    "detect.soft_teacher.unlabeled_ratio",
    "detect.soft_teacher.cls_threshold",
    "detect.soft_teacher.jitter_times",
    "detect.soft_teacher.jitter_scale",
    "detect.soft_teacher.ema_momentum",
    "detect.model.backbone",
    "detect.views.flip_p",
    "detect.views.rotate",
    "detect.views.shear",
    "detect.views.erase_n",
    "detect.views.colour",
    "cka.kernel",
    "cka.debiased",
    "cka.crop_pct",
]


def _at(params, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_smoke_overrides_change_sizes_only(kind):
    gpu_check = _gpu_check()
    profile = load_params(PROFILE)
    smoke = validate_params(gpu_check.smoke_params(kind), f"smoke params ({kind})")
    for key in RECIPE:
        assert _at(smoke, key) == _at(profile, key), key
    assert smoke.runtime.num_workers >= 2 and smoke.prepare.classification.source == "shapes"
    # the one forced departure: no ImageNet weights in a smoke run, so a scratch ResNet with GroupNorm
    assert (profile.detect.model.init, profile.detect.model.norm) == ("torchvision", "frozen_bn")
    assert (smoke.detect.model.init, smoke.detect.model.norm) == ("scratch", "gn")


def test_the_check_runs_dvc_yamls_stages_in_the_dags_order():
    from pipelines.flow import stage_order

    gpu_check = _gpu_check()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = [name for name, _ in gpu_check.stage_commands(REPO / "dvc.yaml", params)]
    assert names == stage_order(REPO)
    commands = dict(gpu_check.stage_commands(REPO / "dvc.yaml", params))
    assert commands["finetune@mae-0"] == f"{params['runtime']['launcher']} -m pipelines.finetune --init mae --seed 0"


@pytest.mark.integration
def test_gpu_check_on_cpu_fills_every_section_and_runs_the_whole_dag(tmp_path):
    """`make gpu-check DEVICE=cpu`: the benchmarks at tiny sizes and the profile's DAG through dvc repro,
    every recipe switch on (bf16 autocast, torch.compile through dynamo (eager backend), 2 DataLoader workers, 10 local
    crops, ...), then pretrain_mae as two torchrun processes."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--time-scale",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    for name in ("mae", "ibot", "detect", "cka"):
        assert results[name]["rc"] == 0 and results[name]["result"], name
    assert results["mae"]["result"]["speedup_vs_transformers"] > 0
    dag = results["dag"]
    assert dag["runner"] == "dvc repro" and dag["completed"] == dag["total"] and dag["all_finite"]
    assert {s["stage"] for s in dag["stages"]} >= {
        "prepare",
        "pretrain_mae",
        "pretrain_ibot",
        "finetune@cnn-0",
        "detect@softteacher-25-0",
        "baselines",
        "cka",
        "report",
    }
    assert all(math.isfinite(s["images_per_s"]) for s in dag["stages"] if s.get("images_per_s"))
    assert (tmp_path / "gpu-check-cpu.md").read_text().startswith("# gpu-check on")
