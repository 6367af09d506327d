"""The detect@{supervised,softteacher}-<pct>-<seed> matrix through `dvc repro` on the micro params, resume,
and errors."""

from __future__ import annotations

import csv

import torch
import yaml

from components.evaluation.coco import coco_evaluate
from components.models.detection import load_detector
from pipelines.detect import merge_categories, parse_variant
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, dvc_repro, run

AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def variants(project) -> list[str]:
    """Every run of the matrix: <method>-<percent>-<seed>."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    percents, seeds = params["prepare"]["detection"]["labeled_percents"], params["detect"]["seeds"]
    return [f"{m}-{p:g}-{s}" for p in percents for m in ("supervised", "softteacher") for s in seeds]


def test_each_method_through_dvc_repro_writes_metrics_plots_and_weights(project):
    dvc_repro(project, "detect")
    params = yaml.safe_load((project / "params.yaml").read_text())["detect"]
    for variant in variants(project):
        method, _, seed = variant.split("-")
        m = read_results(project / "metrics" / "detect" / f"{variant}.json")
        assert m["method"] == method and m["seed"] == int(seed)
        assert m["steps"] == params["steps"] and m["labeled_images"] > 0 and m["val_images"] > 0
        assert m["class_agnostic"] == params.get("class_agnostic", False)
        assert (m["unlabeled_images"] > 0) == (method == "softteacher")
        for who in ("teacher", "student"):
            assert set(m[who]) == AP_KEYS and all(v is None or 0.0 <= v <= 1.0 for v in m[who].values())
            assert m[who]["AP"] is not None and m[who]["APl"] is None  # scenes of 64 px hold no box over 96^2 px
        assert m["AP"] == m["teacher"]["AP"]
        # AP over training (an evaluation every eval_every steps, and the last step) and the losses
        plots = project / "plots" / "detect" / variant
        ap = list(csv.DictReader((plots / "ap.csv").open()))
        assert [int(r["step"]) for r in ap][-1] == params["steps"] and len(ap) >= 2
        assert float(ap[-1]["teacher_AP"]) == m["teacher"]["AP"] and float(ap[-1]["student_AP"]) == m["student"]["AP"]
        loss = list(csv.DictReader((plots / "loss.csv").open()))
        assert len(loss) == params["steps"] // params["log_every"]
        assert ("unsup_loss_classifier" in loss[0]) == (method == "softteacher")
        assert (plots / "predictions.png").stat().st_size > 1000
        # teacher and student weights load strictly from safetensors + detector.json
        for d in (project / "models" / "detect" / variant, project / "models" / "detect" / variant / "student"):
            model, spec, meta = load_detector(d)
            assert meta["method"] == method and len(meta["classes"]) == spec.num_classes
            with torch.no_grad():
                (det,) = model.eval()([torch.rand(3, 64, 64)])
            assert set(det) == {"boxes", "scores", "labels"}
    # the Soft Teacher run saw pseudo boxes (the micro params keep every teacher detection)
    soft = [v for v in variants(project) if v.startswith("softteacher")]
    loss = list(csv.DictReader((project / "plots" / "detect" / soft[0] / "loss.csv").open()))
    assert loss[0]["pseudo_boxes_cls"] == "" and any(
        float(r["pseudo_boxes_cls"] or 0) > 0 for r in loss
    )  # after the burn-in step
    # MLflow: each teacher registered as a model, the alias on a version of this stage
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    for variant in {v.rsplit("-", 1)[0] for v in variants(project)}:  # one registered model per method and percent
        version = client.get_model_version_by_alias(f"mimflow-detect-{variant}", "best")
        tags = client.get_run(version.run_id).data.tags
        assert tags["mimflow.stage"] == f"detect@{variant}-{tags['seed']}" and tags["item"] == variant
    # the seeds are different runs: the same scenes, other heads and data order
    sup = [v for v in variants(project) if v.startswith("supervised")]
    first, second = (list(csv.DictReader((project / "plots" / "detect" / v / "loss.csv").open())) for v in sup[:2])
    assert [r["loss"] for r in first] != [r["loss"] for r in second]
    # nothing changed: nothing re-runs
    assert "Running stage 'detect@" not in dvc_repro(project, "detect").stdout


def test_dvc_repro_force_trains_again_to_the_same_teacher_and_keeps_the_alias_on_a_tie(project):
    """``--force`` means retrain: the persisted checkpoint of the finished run is not resumed, the run
    trains from scratch (same seed: the same teacher and student) with its own timings, and the registry
    alias stays on the first version (a tie is no improvement)."""
    import mlflow

    dvc_repro(project, "detect")
    variant = [v for v in variants(project) if v.startswith("softteacher")][-1]
    item = variant.rsplit("-", 1)[0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    holder = client.get_model_version_by_alias(f"mimflow-detect-{item}", "best")
    before = read_results(project / "metrics" / "detect" / f"{variant}.json")
    info = project / "runs" / "detect" / f"{variant}.json"
    written = info.stat().st_mtime_ns
    proc = run(project, str(BIN / "dvc"), "repro", "--force", "--single-item", f"detect@{variant}")
    assert "resumed" not in proc.stderr and "the checkpoint of a finished run; training" in proc.stderr
    after = read_results(project / "metrics" / "detect" / f"{variant}.json")
    assert after["teacher"] == before["teacher"] and after["student"] == before["student"]
    # its own timings, written by this run: a whole training's (a resumed finished run took ~0.03 s)
    assert info.stat().st_mtime_ns > written
    assert after["train_s"] > 0.25 * before["train_s"] and after["train_images_per_s"] > 0
    assert client.get_model_version_by_alias(f"mimflow-detect-{item}", "best").version == holder.version


def test_a_percent_without_split_is_a_one_line_error(project):
    dvc_repro(project, "prepare")
    proc = run(project, str(BIN / "python"), "-m", "pipelines.detect", "--variant", "softteacher-30", check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: detect@softteacher-30-0:")
    assert "30_fold0" in last and "prepare.detection.labeled_percents" in last
    proc = run(project, str(BIN / "python"), "-m", "pipelines.detect", "--variant", "fancy-10", check=False)
    assert proc.returncode == 1 and "not <method>-<percent>" in proc.stderr.strip().splitlines()[-1]
    proc = run(
        project,
        str(BIN / "python"),
        "-m",
        "pipelines.detect",
        "--variant",
        "softteacher-20",
        "--seed",
        "7",
        check=False,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == "error: detect@softteacher-20-7: --seed 7: not one of detect.seeds = [0, 1]"


def test_class_agnostic_merges_categories_and_scores_boxes_whatever_their_class():
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "star"}, {"id": 7, "name": "ring"}],
    }
    merged = merge_categories(coco)
    assert merged["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert [a["category_id"] for a in merged["annotations"]] == [1, 1] and coco["annotations"][0]["category_id"] == 3
    swapped = [
        {"image_id": 1, "category_id": 10 - a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in coco["annotations"]
    ]
    assert coco_evaluate(coco, swapped)["AP"] == 0.0  # wrong classes
    assert coco_evaluate(merged, [{**r, "category_id": 1} for r in swapped])["AP"] == 1.0  # right boxes


def test_variant_names():
    assert parse_variant("softteacher-10") == ("softteacher", 10.0) and parse_variant("supervised-0.5") == (
        "supervised",
        0.5,
    )


def test_a_pretrained_vit_detector_normalises_as_its_encoder(tmp_path):
    """detector_spec reads the pretrained encoder's mean/std (encoder.json), as finetune does."""
    from types import SimpleNamespace

    from components.models.vit import ViTSpec, create_vit, save_encoder
    from pipelines.detect import detector_spec
    from tests.pipelines.conftest import micro_config

    params = micro_config()
    vit = ViTSpec(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    save_encoder(
        create_vit(vit),
        vit,
        tmp_path / "models" / "pretrain_mae",
        source="pretrain_mae",
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3],
    )
    section = params.detect.model_copy(
        update={"model": params.detect.model.model_copy(update={"backbone": "vit", "init": "mae"})}
    )
    spec, encoder_dir = detector_spec(SimpleNamespace(section=section, root=tmp_path, params=params), 1)
    assert encoder_dir == tmp_path / "models" / "pretrain_mae" and spec.vit == vit.to_dict()
    assert spec.image_mean == (0.5, 0.4, 0.3) and spec.image_std == (0.2, 0.25, 0.3)


def test_a_reversed_short_side_range_is_a_params_error():
    import pytest

    from pipelines.config import ParamsError, validate_params
    from tests.pipelines.conftest import micro_params

    raw = micro_params()
    raw["detect"]["views"]["short_side_range"] = [1200, 400]
    with pytest.raises(ParamsError, match=r"detect.views.short_side_range = \[1200, 400\]: must be \[min, max\]"):
        validate_params(raw, "params.yaml")


def test_a_bn_detector_needs_the_teacher_to_copy_buffers():
    import pytest

    from pipelines.config import ParamsError, validate_params
    from tests.pipelines.conftest import micro_params

    raw = micro_params()
    raw["detect"]["model"]["norm"] = "bn"
    raw["detect"]["soft_teacher"]["ema_buffers"] = False
    with pytest.raises(
        ParamsError, match=r"detect.soft_teacher.ema_buffers = False: must be true with model.norm 'bn'"
    ):
        validate_params(raw, "params.yaml")
    raw["detect"]["soft_teacher"]["ema_buffers"] = True
    assert validate_params(raw, "params.yaml").detect.soft_teacher.ema_buffers
