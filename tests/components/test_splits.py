"""Soft Teacher's semi-supervised protocol: P % labeled per fold, sampled without replacement."""

import json

import pytest

from components.data.sources import DataError
from components.data.splits import labeled_split, num_labeled, read_labeled_indices, split_coco


@pytest.mark.parametrize(
    "n, percent, expected",
    [
        (1000, 1, 10),
        (1000, 5, 50),
        (1000, 10, 100),
        (30, 5, 2),
        (10, 1, 1),
        (1, 1, 1),
        (50, 1, 1),
        (250, 1, 3),
        (7, 100, 7),
    ],
)
def test_labeled_count_is_rounded_percent_and_at_least_one(n, percent, expected):
    assert num_labeled(n, percent) == expected
    labeled, unlabeled = labeled_split(range(n), percent, fold=1, seed=0)
    assert len(labeled) == expected and len(unlabeled) == n - expected


def test_split_partitions_the_ids_and_is_fixed_by_seed_and_fold():
    ids = list(range(100, 400, 3))
    labeled, unlabeled = labeled_split(ids, 10, fold=1, seed=0)
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
    assert not set(labeled) & set(unlabeled) and sorted(labeled + unlabeled) == ids
    assert labeled_split(list(reversed(ids)), 10, fold=1, seed=0) == (labeled, unlabeled)  # input order is irrelevant
    folds = [labeled_split(ids, 10, fold=k, seed=0)[0] for k in range(1, 6)]
    assert len({tuple(f) for f in folds}) == 5  # folds differ
    assert labeled_split(ids, 10, fold=1, seed=1)[0] != labeled  # the seed matters
    # nested within a fold: the 1 % images are among the 5 % ones, which are among the 10 % ones
    one, five = labeled_split(ids, 1, 1, 0)[0], labeled_split(ids, 5, 1, 0)[0]
    assert set(one) <= set(five) <= set(labeled)


def test_split_samples_uniformly_without_replacement():
    counts = dict.fromkeys(range(20), 0)
    for fold in range(400):
        labeled, _ = labeled_split(range(20), 25, fold=fold, seed=0)
        assert len(set(labeled)) == 5
        for i in labeled:
            counts[i] += 1
    assert all(60 <= c <= 140 for c in counts.values())  # expected 100 each


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="percent"):
        labeled_split(range(10), 0, 1, 0)
    with pytest.raises(ValueError, match="percent"):
        labeled_split(range(10), 120, 1, 0)
    with pytest.raises(ValueError, match="unique"):
        labeled_split([1, 1, 2], 50, 1, 0)


def test_split_coco_keeps_labeled_annotations_and_drops_unlabeled_ones():
    coco = {
        "info": {"image_root": "images/train"},
        "categories": [{"id": 1, "name": "circle"}],
        "images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 7)],
        "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2]} for i in range(1, 7)],
    }
    labeled_ids, _ = labeled_split([im["id"] for im in coco["images"]], 50, fold=1, seed=0)
    labeled, unlabeled = split_coco(coco, labeled_ids)
    assert [im["id"] for im in labeled["images"]] == labeled_ids
    assert sorted(a["image_id"] for a in labeled["annotations"]) == labeled_ids
    assert unlabeled["annotations"] == [] and len(unlabeled["images"]) == 3
    assert not {im["id"] for im in labeled["images"]} & {im["id"] for im in unlabeled["images"]}
    assert labeled["categories"] == unlabeled["categories"] == coco["categories"]
    assert labeled["info"] == unlabeled["info"] == coco["info"] and len(coco["annotations"]) == 6
    with pytest.raises(ValueError, match="not in the COCO images"):
        split_coco(coco, [99])


def test_read_labeled_indices_checks_the_file(tmp_path):
    path = tmp_path / "labeled_10_fold1.json"
    path.write_text(json.dumps({"percent": 10, "fold": 1, "labeled": [0, 4, 7]}))
    assert read_labeled_indices(path, 10) == [0, 4, 7]
    with pytest.raises(DataError, match=r"labeled_10_fold1.json: labeled\[2\] = 7 is not an index in 0..4"):
        read_labeled_indices(path, 5)
    path.write_text(json.dumps({"percent": 10}))
    with pytest.raises(DataError, match="labeled_10_fold1.json: missing key 'labeled'"):
        read_labeled_indices(path, 5)
