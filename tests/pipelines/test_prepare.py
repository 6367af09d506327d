"""The prepare stage through `dvc repro` on the micro params, and its error paths."""

from __future__ import annotations

import json

import yaml

from components.data.sources import load_classification_index, load_coco
from components.io import DIR_MODE
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, dvc_repro, make_project, run


def test_prepare_through_dvc_repro_writes_datasets_splits_and_metrics(project):
    dvc_repro(project, "prepare")
    metrics = read_results(project / "metrics" / "prepare.json")
    assert metrics["classification"]["train"] == 8 * 12 and metrics["classification"]["val"] == 8 * 6
    assert metrics["detection"]["train_images"] == 20 and metrics["detection"]["splits"]["20_fold0"] == {
        "labeled": 4,
        "unlabeled": 16,
    }
    index = load_classification_index(project / "data" / "classification" / "index.json")
    assert len(index.classes) >= 6 and all(p.is_file() for p, _ in index.train)
    split = json.loads((project / "data" / "classification" / "splits" / "labeled_50_fold0.json").read_text())
    assert len(split["labeled"]) == 48
    unlabeled = load_coco(project / "data" / "detection" / "splits" / "20_fold0" / "unlabeled.json")
    assert unlabeled["annotations"] == [] and len(unlabeled["images"]) == 16
    assert (project / "plots" / "prepare" / "detection_samples.png").stat().st_size > 1000
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "prepare" in lock["stages"]
    # Up to date now: a second repro does not run the stage again.
    assert (
        "didn't change" in dvc_repro(project, "prepare").stdout or "up to date" in dvc_repro(project, "prepare").stdout
    )


def test_same_params_give_byte_identical_data(tmp_path, project):
    dvc_repro(project, "prepare")
    other = make_project(tmp_path / "again")
    run(other, str(BIN / "python"), "-m", "pipelines.prepare")
    for rel in [
        "data/classification/index.json",
        "data/detection/train.json",
        "data/detection/splits/20_fold0/labeled.json",
        "data/classification/images/train/star/star_00003.png",
        "data/detection/images/val/000002.png",
    ]:
        assert (project / rel).read_bytes() == (other / rel).read_bytes(), rel


def _set(root, path: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_bad_params_stop_before_writing_with_the_key_path(tmp_path):
    root = make_project(tmp_path / "p")
    for key, value, expected in [
        ("prepare.no_such_knob", 1, "prepare.no_such_knob: unknown key"),
        ("prepare.classification.image_size", "big", "prepare.classification.image_size = 'big'"),
        ("runtime.seed", -3, "runtime.seed = -3"),
        ("prepare.detection.min_objects", 9, "prepare.detection.min_objects = 9"),
        ("prepare.classification.rotation", [90, 45], "prepare.classification.rotation = [90.0, 45.0]: a range"),
    ]:
        root = make_project(tmp_path / key)
        _set(root, key, value)
        proc = run(root, str(BIN / "python"), "-m", "pipelines.prepare", check=False)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert expected in last, last
        assert not (root / "data").exists() and not (root / "metrics").exists()


def test_a_broken_coco_file_is_one_line_naming_it_and_keeps_earlier_data(tmp_path, project):
    root = make_project(tmp_path / "coco")
    run(root, str(BIN / "python"), "-m", "pipelines.prepare")
    before = (root / "data" / "detection" / "train.json").read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    detection = yaml.safe_load((root / "params.yaml").read_text())["prepare"]["detection"]
    _set(
        root,
        "prepare.detection",
        {
            **detection,
            "source": "coco",
            "train_images": str(tmp_path),
            "train_annotations": str(bad),
            "val_images": str(tmp_path),
            "val_annotations": str(bad),
        },
    )
    proc = run(root, str(BIN / "python"), "-m", "pipelines.prepare", check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "annotations" in last, last
    assert (root / "data" / "detection" / "train.json").read_bytes() == before


def test_a_corrupt_image_is_one_line_naming_it_and_keeps_earlier_data(tmp_path):
    """prepare on an ImageFolder with a truncated PNG: exit 1, the last line names the file, and the
    classification data of the earlier run is untouched (nothing half-written)."""
    from PIL import Image

    root = make_project(tmp_path / "img")
    run(root, str(BIN / "python"), "-m", "pipelines.prepare")
    before = (root / "data" / "classification" / "index.json").read_bytes()
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(4):
                (folder / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / split / cls / f"{i}.png")
    bad = folder / "train" / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    _set(
        root,
        "prepare.classification",
        {
            **yaml.safe_load((root / "params.yaml").read_text())["prepare"]["classification"],
            "source": "imagefolder",
            "root": str(folder),
            "labeled_percents": [50],
        },
    )
    proc = run(root, str(BIN / "python"), "-m", "pipelines.prepare", check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: prepare:") and str(bad) in last, last
    assert (root / "data" / "classification" / "index.json").read_bytes() == before


def test_an_interrupted_swap_keeps_the_old_dataset(tmp_path, monkeypatch):
    """build_in_place renames the old dataset aside before the new one goes in, so a swap that dies
    half-way leaves the old one whole; a normal swap leaves no sibling behind and the usual mode."""
    import os

    from pipelines import prepare

    final = tmp_path / "data" / "classification"
    prepare.build_in_place(final, lambda tmp: (tmp / "index.json").write_text("v1"))
    assert oct(final.stat().st_mode & 0o777) == oct(DIR_MODE)  # what mkdir gives under this umask
    real_replace = os.replace

    def interrupted(src, dst):
        if str(dst) == str(final) and not str(src).endswith(".old"):  # the new dataset going in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(prepare.os, "replace", interrupted)
    try:
        prepare.build_in_place(final, lambda tmp: (tmp / "index.json").write_text("v2"))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert (final / "index.json").read_text() == "v1"
    assert sorted(p.name for p in final.parent.iterdir()) == ["classification"]
    prepare.build_in_place(final, lambda tmp: (tmp / "index.json").write_text("v3"))
    assert (final / "index.json").read_text() == "v3" and sorted(p.name for p in final.parent.iterdir()) == [
        "classification"
    ]
