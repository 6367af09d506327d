"""Readers: ImageFolder, CIFAR-10 batches, COCO validation, the classification index and the datasets."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.sources import (
    CocoDetection,
    DataError,
    ImageListDataset,
    load_classification_index,
    load_coco,
    open_image,
    read_cifar10,
    read_coco,
    read_image_folder,
    validate_coco,
    write_array_images,
)


def _png(path: Path, size=(8, 6), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    _png(path, size=(16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------------------------- images
def test_open_image_names_corrupt_and_truncated_files(tmp_path):
    assert open_image(_png(tmp_path / "ok.png")).size == (8, 6)
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"not an image at all")
    for path in (bad, _truncated_png(tmp_path / "half.png"), tmp_path / "absent.png"):
        with pytest.raises(DataError) as e:
            open_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_image_folder_reads_a_tree_and_skips_or_rejects_bad_images(tmp_path):
    root = tmp_path / "folder"
    for name in ("a1.png", "a2.jpg"):
        _png(root / "cat" / name)
    _png(root / "dog" / "d1.png")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    classes, items, skipped = read_image_folder(root)
    assert classes == ["cat", "dog"]
    assert [(Path(p).name, label) for p, label in items] == [("a1.png", 0), ("a2.jpg", 0), ("d1.png", 1)]
    assert all(Path(p).is_absolute() for p, _ in items) and skipped == {"unreadable_images": 0, "empty_classes": 0}

    bad = _truncated_png(root / "dog" / "d2.png")
    with pytest.raises(DataError, match="d2.png"):
        read_image_folder(root)
    classes, items, skipped = read_image_folder(root, on_error="skip")
    assert len(items) == 3 and skipped["unreadable_images"] == 1
    assert len(read_image_folder(root, check_images=False)[1]) == 4  # no decoding asked: bad file kept
    bad.unlink()

    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_image_folder(root)
    classes, items, skipped = read_image_folder(root, on_error="skip")
    assert classes == ["cat", "dog", "empty"] and skipped["empty_classes"] == 1


def test_an_image_folder_with_fewer_than_two_classes_is_an_error_naming_the_root(tmp_path):
    root = tmp_path / "one"
    _png(root / "cat" / "a1.png")
    with pytest.raises(
        DataError, match=r"one: 1 class folder\(s\) with images \(cat\); classification needs at least 2"
    ):
        read_image_folder(root)
    (root / "dog").mkdir()  # an empty second class does not make two, even when empty classes are skipped
    with pytest.raises(DataError, match=r"one: 1 class folder\(s\) with images \(cat\)"):
        read_image_folder(root, on_error="skip")
    _png(root / "dog" / "d1.png")
    assert read_image_folder(root)[0] == ["cat", "dog"]


def test_image_folder_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        read_image_folder(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)


def test_image_list_dataset_returns_rgb_and_names_a_corrupt_file(tmp_path):
    good = _png(tmp_path / "g.png")
    bad = _truncated_png(tmp_path / "b.png")
    ds = ImageListDataset([(good, 1), (bad, 0)], transform=lambda im: torch.tensor(np.asarray(im)))
    x, y = ds[0]
    assert x.shape == (6, 8, 3) and y == 1 and x[0, 0].tolist() == [200, 30, 30]
    with pytest.raises(DataError, match="b.png"):
        ds[1]


# --------------------------------------------------------------------------------------------- CIFAR
def _write_cifar(root: Path, n_per_batch=3) -> dict:
    """A tiny CIFAR-10 python batch directory, in the layout and dtypes of the real one."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072, "num_cases_per_batch": n_per_batch}, f, protocol=2)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        blob = pickle.dumps(
            {
                "batch_label": name,
                "labels": labels,
                "data": data,
                "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)],
            },
            protocol=2,
        )
        if name == "test_batch":  # the real files name numpy 1's module path
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (base / name).write_bytes(blob)
        batches[name] = (data, labels)
    return batches


def test_cifar_reader_reads_a_test_written_batch_as_hwc_images(tmp_path):
    batches = _write_cifar(tmp_path)
    classes, images, labels = read_cifar10(tmp_path, train=True)
    assert classes[0] == "airplane" and len(classes) == 10
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8 and len(labels) == 15
    data, lab = batches["data_batch_1"]
    # CIFAR rows are [R plane (1024), G plane, B plane]: pixel (0, 1) of image 0 is (data[1], data[1025], data[2049])
    assert images[0, 0, 1].tolist() == [data[0, 1], data[0, 1025], data[0, 2049]]
    assert labels[:3] == lab
    _, test_images, test_labels = read_cifar10(tmp_path, train=False)
    assert test_images.shape == (3, 32, 32, 3) and test_labels == batches["test_batch"][1]

    items = write_array_images(tmp_path / "out", "images/train", images[:4], labels[:4], classes)
    assert items[0] == [f"images/train/{classes[labels[0]]}/00000.png", labels[0]]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / items[2][0])), images[2])


def test_cifar_reader_refuses_foreign_pickles_and_bad_structure(tmp_path):
    _write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": Path("/etc/passwd"), "labels": []}, f)  # a pickle that would build an arbitrary object
    with pytest.raises(DataError, match="data_batch_2.*not allowed"):
        read_cifar10(tmp_path, train=True)
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be a uint8 array \[N, 3072\]"):
        read_cifar10(tmp_path, train=True)
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}, f)
    with pytest.raises(DataError, match="data_batch_2: label 12"):
        read_cifar10(tmp_path, train=True)
    batch.unlink()
    with pytest.raises(DataError, match="data_batch_2: CIFAR-10 file not found"):
        read_cifar10(tmp_path, train=True)
    with pytest.raises(DataError, match="cifar-10-batches-py: CIFAR-10 directory not found"):
        read_cifar10(tmp_path / "elsewhere", train=False)


# --------------------------------------------------------------------------------------------- COCO
def _coco(tmp_path: Path) -> dict:
    for name in ("1.png", "2.png"):
        _png(tmp_path / "imgs" / name, size=(40, 30))
    return {
        "info": {"image_root": "imgs"},
        "images": [
            {"id": 1, "file_name": "1.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "2.png", "width": 40, "height": 30},
        ],
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "star"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [20, 10, 20, 20]},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40.5, 30], "iscrowd": 0},
        ],
    }


def test_validate_coco_accepts_good_data_and_fills_defaults(tmp_path):
    coco = _coco(tmp_path)
    cleaned, skipped = validate_coco(coco, "in-memory", image_dir=tmp_path / "imgs", check_images=True)
    assert not any(skipped.values()) and len(cleaned["annotations"]) == 3
    assert cleaned["annotations"][0]["area"] == 50 and cleaned["annotations"][0]["iscrowd"] == 0
    assert cleaned["annotations"][2]["bbox"] == [0.0, 0.0, 40.0, 30.0]  # half a pixel over the edge: clipped
    assert "area" not in coco["annotations"][0]  # the input is not modified


@pytest.mark.parametrize(
    "break_it, reason, message",
    [
        (
            lambda c: c["annotations"][1].update(bbox=[30, 10, 20, 5]),
            "annotations_outside_image",
            r"annotations\[1\] \(id=11\).*outside image 1",
        ),
        (
            lambda c: c["annotations"][1].update(bbox=[5, 5, 0, 4]),
            "annotations_zero_area",
            r"annotations\[1\] \(id=11\).*zero area",
        ),
        (
            lambda c: c["annotations"][1].update(image_id=99),
            "annotations_missing_image",
            r"annotations\[1\] \(id=11\) points to image_id 99",
        ),
        (
            lambda c: c["annotations"][1].update(category_id=4),
            "annotations_unknown_category",
            r"annotations\[1\] \(id=11\) category_id 4",
        ),
        (
            lambda c: c["annotations"][1].pop("bbox"),
            "annotations_missing_keys",
            r"annotations\[1\] missing key\(s\) 'bbox'",
        ),
        (
            lambda c: c["images"][1].update(file_name="gone.png"),
            "images_missing_file",
            r"images\[1\] \(id=2\) file .*gone.png not found",
        ),
        (
            lambda c: c["images"][1].update(file_name=None),
            "images_missing_keys",
            r"images\[1\] needs an integer 'id' and a file name, got id 2, file_name None",
        ),
        (
            lambda c: c["annotations"][1].update(image_id=[1]),
            "annotations_missing_keys",
            r"annotations\[1\] \(id=11\) id, image_id and category_id must be integers",
        ),
        (
            lambda c: c["annotations"][1].update(iscrowd="0"),
            "annotations_missing_keys",
            r"annotations\[1\] \(id=11\) iscrowd must be 0 or 1, got '0'",
        ),
        (
            lambda c: c["annotations"][1].update(area=-5),
            "annotations_missing_keys",
            r"annotations\[1\] \(id=11\) area must be a number >= 0",
        ),
    ],
)
def test_each_bad_entry_is_named_or_skipped(tmp_path, break_it, reason, message):
    coco = _coco(tmp_path)
    break_it(coco)
    with pytest.raises(DataError, match=r"^in\.json: " + message) as e:
        validate_coco(coco, "in.json", image_dir=tmp_path / "imgs")
    assert "\n" not in str(e.value)
    cleaned, skipped = validate_coco(coco, "in.json", image_dir=tmp_path / "imgs", on_error="skip")
    assert skipped[reason] == 1
    if reason.startswith("images_"):  # the image goes, and its annotation with it
        assert [im["id"] for im in cleaned["images"]] == [1] and skipped["annotations_of_skipped_images"] == 1
    else:
        assert [a["id"] for a in cleaned["annotations"]] == [10, 12]


def test_unreadable_image_is_named_or_skipped(tmp_path):
    coco = _coco(tmp_path)
    _truncated_png(tmp_path / "imgs" / "2.png")
    with pytest.raises(DataError, match=r"images\[1\] \(id=2\).*2.png: unreadable image"):
        validate_coco(coco, "x.json", image_dir=tmp_path / "imgs", check_images=True)
    _, skipped = validate_coco(coco, "x.json", image_dir=tmp_path / "imgs", check_images=True, on_error="skip")
    assert skipped["images_unreadable"] == 1


def test_image_whose_size_differs_from_its_entry_is_named_or_skipped(tmp_path):
    coco = _coco(tmp_path)
    coco["images"][1]["width"] = 41  # the file is 40x30
    with pytest.raises(DataError, match=r"images\[1\] \(id=2\) .*2.png is 40x30, but the entry says 41x30"):
        validate_coco(coco, "x.json", image_dir=tmp_path / "imgs", check_images=True)
    cleaned, skipped = validate_coco(coco, "x.json", image_dir=tmp_path / "imgs", check_images=True, on_error="skip")
    assert skipped["images_size_mismatch"] == 1 and [im["id"] for im in cleaned["images"]] == [1]


def test_wrongly_typed_categories_and_image_root_are_one_line_errors(tmp_path):
    coco = _coco(tmp_path)
    coco["categories"][0]["id"] = [3]
    with pytest.raises(
        DataError, match=r"^x.json: categories\[0\] needs an integer 'id' and a string 'name', got \[3\]"
    ):
        validate_coco(coco, "x.json", on_error="skip")  # structural: never skipped
    coco = _coco(tmp_path)
    coco["info"]["image_root"] = 5
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"bad.json: info.image_root must be a path string, got 5"):
        load_coco(path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_file_with_missing_key_names_file_and_key(tmp_path, key):
    coco = _coco(tmp_path)
    del coco[key]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=rf"bad.json: missing key '{key}'"):
        load_coco(path, on_error="skip")  # structural errors cannot be skipped


def test_load_coco_resolves_image_root_and_missing_directory(tmp_path):
    coco = _coco(tmp_path)
    path = tmp_path / "ann" / "train.json"
    path.parent.mkdir()
    coco["info"]["image_root"] = "../imgs"
    path.write_text(json.dumps(coco))
    loaded, skipped = read_coco(path)
    assert Path(loaded["info"]["image_root"]) == (tmp_path / "imgs").resolve() and not any(skipped.values())
    coco["info"]["image_root"] = "../nowhere"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="train.json: image directory .*nowhere not found"):
        load_coco(path)
    with pytest.raises(DataError, match="absent.json: file not found"):
        load_coco(tmp_path / "absent.json")


def test_coco_detection_targets_are_xyxy_with_category_ids(tmp_path):
    coco = _coco(tmp_path)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    ds = CocoDetection(load_coco(path))
    assert len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image[:, 0, 0], torch.tensor([200, 30, 30]) / 255)
    assert target["boxes"].tolist() == [[1, 2, 11, 7], [20, 10, 40, 30]]
    assert target["labels"].tolist() == [3, 7] and target["labels"].dtype == torch.int64 and target["image_id"] == 1
    # images without annotations (the unlabeled split) give empty targets of the right shapes
    coco["annotations"] = []
    _, empty = CocoDetection(coco, tmp_path / "imgs")[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # transforms v2 move the boxes with the image
    from torchvision.transforms import v2

    image, target = CocoDetection(load_coco(path), transforms=v2.RandomHorizontalFlip(p=1.0))[0]
    assert target["boxes"].tolist() == [[29, 2, 39, 7], [0, 10, 20, 30]]


def test_coco_detection_rejects_a_size_mismatch(tmp_path):
    coco = _coco(tmp_path)
    coco["images"][0]["width"] = 41
    with pytest.raises(DataError, match="1.png: image is 40x30 but its COCO entry"):
        CocoDetection(coco, tmp_path / "imgs")[0]


# --------------------------------------------------------------------------------------------- index
def test_classification_index_resolves_paths_and_names_bad_entries(tmp_path):
    _png(tmp_path / "images" / "a.png")
    index = {
        "source": "shapes",
        "classes": ["a", "b"],
        "image_size": 8,
        "train": [["images/a.png", 0]],
        "val": [["images/a.png", 1]],
    }
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index))
    loaded = load_classification_index(path)
    assert loaded.classes == ["a", "b"] and loaded.image_size == 8 and loaded.source == "shapes"
    assert loaded.train == [(tmp_path / "images" / "a.png", 0)]
    index["val"] = [["images/a.png", 2]]
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"index.json: val\[0\] must be \[path, label in 0..1\]"):
        load_classification_index(path)
    index["val"] = [["images/missing.png", 1]]
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"index.json: val\[0\] image .*missing.png not found"):
        load_classification_index(path)
    del index["classes"]
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="index.json: missing key 'classes'"):
        load_classification_index(path)
