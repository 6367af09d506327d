"""COCO evaluation with pycocotools: perfect predictions give AP 1, none give 0, IoU thresholds hold."""

import pytest
import torch

from components.evaluation.coco import AP_KEYS, coco_evaluate, predict, prediction_figure, to_coco_results


def ground_truth():
    """Two 640x640 images with a small (<32^2), a medium and a large (>96^2) box; category ids 3 and 7."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 640, "height": 640},
        {"id": 2, "file_name": "b.png", "width": 640, "height": 640},
    ]
    boxes = [
        (1, 3, [10, 10, 20, 20]),
        (1, 7, [100, 100, 60, 50]),
        (2, 3, [200, 150, 150, 120]),
        (2, 7, [5, 300, 25, 25]),
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate(boxes)
    ]
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "ring"}],
    }


def as_results(coco, shift=0.0):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]],
            "score": 0.9,
        }
        for a in coco["annotations"]
    ]


def test_ground_truth_as_predictions_gives_ap_one():
    coco = ground_truth()
    ap = coco_evaluate(coco, as_results(coco))
    assert set(ap) == set(AP_KEYS)
    for k in AP_KEYS:
        assert ap[k] == pytest.approx(1.0), k


def test_an_annotation_with_id_0_can_be_found():
    """COCOeval reads a matched ground-truth id of 0 as "no match"; ids starting at 0 must still give AP 1."""
    coco = ground_truth()
    for i, a in enumerate(coco["annotations"]):
        a["id"] = i
    assert all(coco_evaluate(coco, as_results(coco))[k] == pytest.approx(1.0) for k in AP_KEYS)
    assert [a["id"] for a in coco["annotations"]] == [0, 1, 2, 3]  # the caller's dict is left as it was


def test_no_predictions_give_zero():
    assert coco_evaluate(ground_truth(), []) == {k: 0.0 for k in AP_KEYS}


@pytest.mark.parametrize("predictions", ["perfect", "none"])
def test_a_size_range_without_ground_truth_has_no_ap(predictions):
    """pycocotools gives -1 where a size range holds no box: that is "undefined" (None), not 0,
    which would read as a detector that finds none of them."""
    coco = ground_truth()
    coco["annotations"] = [a for a in coco["annotations"] if a["area"] <= 96**2]  # no large box left
    ap = coco_evaluate(coco, as_results(coco) if predictions == "perfect" else [])
    assert ap["APl"] is None
    expected = 1.0 if predictions == "perfect" else 0.0
    assert all(ap[k] == pytest.approx(expected) for k in AP_KEYS if k != "APl"), ap


def test_wrong_class_gives_zero_and_iou_thresholds_apply():
    coco = ground_truth()
    wrong = [{**r, "category_id": 10 - r["category_id"]} for r in as_results(coco)]  # 3 <-> 7
    assert coco_evaluate(coco, wrong)["AP"] == 0.0
    # shifted by 25 % of the width: IoU = 0.75 / 1.25 = 0.6 -> counts at 0.5, not at 0.75
    ap = coco_evaluate(coco, as_results(coco, shift=0.25))
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP75"] == 0.0
    assert 0.0 < ap["AP"] < 0.5


def test_torchvision_detections_map_to_coco_results():
    det = {
        "image_id": 2,
        "boxes": torch.tensor([[200.0, 150.0, 350.0, 270.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
    }
    res = to_coco_results([det], label_to_category=[3, 7])
    assert res == [{"image_id": 2, "category_id": 3, "bbox": [200.0, 150.0, 150.0, 120.0], "score": pytest.approx(0.8)}]


class FixedDetector(torch.nn.Module):
    """Returns one box per image, the image's mean intensity as its score."""

    def forward(self, images):
        return [
            {
                "boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]),
                "scores": img.mean().reshape(1),
                "labels": torch.tensor([2]),
            }
            for img in images
        ]


def test_predict_batches_and_keeps_image_ids():
    model = FixedDetector().train()
    dets = predict(model, [(i, torch.full((3, 8, 8), i / 10)) for i in range(5)], torch.device("cpu"), batch_size=2)
    assert [d["image_id"] for d in dets] == list(range(5))
    assert torch.allclose(torch.stack([d["scores"][0] for d in dets]), torch.arange(5) / 10)
    assert model.training  # mode restored


def test_prediction_figure_draws_one_panel_per_image():
    gt = {"boxes": torch.tensor([[1.0, 1.0, 6.0, 6.0]]), "labels": torch.tensor([1])}
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 2.0, 2.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([2, 1]),
    }
    fig = prediction_figure([torch.rand(3, 8, 8)] * 3, [gt] * 3, [det] * 3, ["circle", "ring"])
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 3
    assert len(drawn[0].patches) == 2  # one ground-truth box, one detection above the 0.5 score threshold
