"""Prepared data is portable and tracked: no absolute path in what prepare writes,
paths relative to a declared root, a content hash per external image, and `dvc status` sees a changed
image under datasets/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.sources import DataError, load_classification_index, load_coco
from pipelines import prepare
from pipelines.config import ClassificationData, DetectionData
from tests.pipelines.conftest import BIN, dvc_repro, make_project, params_section, run


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            for i in range(2):
                _png(root / split / cls / f"{i}.png", 40 * c + 10 * i)
    return root


def _no_absolute_path(obj, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_absolute_path(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_absolute_path(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        assert not Path(obj).is_absolute(), f"{where} = {obj}"


def test_imagefolder_index_is_relative_to_its_root_and_hashes_every_image(tmp_path):
    src = image_folder(tmp_path / "src")
    cfg = params_section(
        ClassificationData, "prepare.classification", source="imagefolder", root="src", labeled_percents=[50]
    )
    out = tmp_path / "out"
    prepare.classification_dataset(cfg, 0, "error", out, project=tmp_path)
    raw = json.loads((out / "index.json").read_text())
    _no_absolute_path(raw, "index")
    assert raw["root"] == "prepare.classification.root"
    assert raw["train"][0][:2] == ["train/a/0.png", 0] and len(raw["train"][0][2]) == 16

    # The dataset's folder moves: the same index reads it from the new root.
    moved = tmp_path / "elsewhere" / "digits"
    shutil.copytree(src, moved)
    index = load_classification_index(out / "index.json", root=moved)
    assert index.train[0] == (moved / "train" / "a" / "0.png", 0)
    # A missing root is one line naming its params key.
    with pytest.raises(DataError, match=r"^prepare.classification.root: .*gone not found \(the images of .*index.json"):
        load_classification_index(out / "index.json", root=tmp_path / "gone")
    with pytest.raises(DataError, match=r"index.json: its image paths are relative to prepare.classification.root"):
        load_classification_index(out / "index.json")
    with pytest.raises(DataError, match=r"^prepare.classification.root: .*nowhere not found"):
        prepare.classification_dataset(
            params_section(
                ClassificationData, "prepare.classification", source="imagefolder", root=str(tmp_path / "nowhere")
            ),
            0,
            "error",
            tmp_path / "out2",
            project=tmp_path,
        )

    # One changed image changes the index (and so every stage DVC runs after prepare); the same images do not.
    before = (out / "index.json").read_bytes()
    prepare.classification_dataset(cfg, 0, "error", out, project=tmp_path)
    assert (out / "index.json").read_bytes() == before
    _png(src / "train" / "b" / "1.png", 200)
    prepare.classification_dataset(cfg, 0, "error", out, project=tmp_path)
    after = json.loads((out / "index.json").read_text())
    assert after["train"][3][:2] == raw["train"][3][:2] and after["train"][3][2] != raw["train"][3][2]
    assert after["train"][:3] == raw["train"][:3]


def test_coco_files_are_relative_to_their_declared_image_roots(tmp_path):
    images = tmp_path / "coco" / "images"
    for i in range(4):
        _png(images / f"{i}.png", 30 * i, size=32)
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(4)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in range(4)],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "coco" / "ann.json").write_text(json.dumps(coco))
    cfg = params_section(
        DetectionData,
        "prepare.detection",
        source="coco",
        train_images="coco/images",
        train_annotations=str(tmp_path / "coco" / "ann.json"),
        val_images="coco/images",
        val_annotations=str(tmp_path / "coco" / "ann.json"),
        labeled_percents=[50],
    )
    out = tmp_path / "out"
    prepare.detection_dataset(cfg, 0, "error", out, project=tmp_path)
    for rel in ("train.json", "val.json", "splits/50_fold0/labeled.json", "splits/50_fold0/unlabeled.json"):
        raw = json.loads((out / rel).read_text())
        _no_absolute_path(raw, rel)
        assert raw["info"]["root"].startswith("prepare.detection.") and all(
            len(im["sha256"]) == 16 for im in raw["images"]
        )
    with pytest.raises(DataError, match=r"train.json: its image paths are relative to prepare.detection.train_images"):
        load_coco(out / "train.json")
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    assert load_coco(out / "splits" / "50_fold0" / "labeled.json", image_root=moved)["info"]["image_root"] == str(
        moved.resolve()
    )


@pytest.mark.integration  # ~35 s on 2 shared cores: four dvc calls
def test_dvc_status_reports_prepare_when_an_image_under_datasets_changes(tmp_path):
    root = make_project(tmp_path / "p")
    image_folder(root / "datasets" / "tiny")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["classification"].update(source="imagefolder", root="datasets/tiny")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(BIN / "dvc")
    run(root, dvc, "add", "datasets/tiny")  # the README's way: DVC caches the images, git tracks tiny.dvc
    dvc_repro(root, "prepare")
    assert "up to date" in run(root, dvc, "status", "prepare").stdout
    index = (root / "data" / "classification" / "index.json").read_text()
    assert str(root) not in index and str(tmp_path) not in index
    _png(root / "datasets" / "tiny" / "train" / "a" / "0.png", 255)  # a relabeled or edited image
    status = run(root, dvc, "status", "prepare").stdout  # its index then changes, so every later stage re-runs (above)
    assert "prepare:" in status and "changed deps" in status and "modified:           datasets" in status, status
    # The data folder moves with the project: a copy elsewhere reads the same index.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    run(
        copy,
        str(BIN / "python"),
        "-c",
        "from pathlib import Path; from components.data.sources import load_classification_index; "
        "i = load_classification_index('data/classification/index.json', root=Path('datasets/tiny')); "
        "assert all(str(p).startswith('datasets') and p.is_file() for p, _ in i.train)",
    )
