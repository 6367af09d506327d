"""Boxes follow the pixels between views: flips, resizes and affine transforms (Soft Teacher's
weak/strong views move pseudo boxes with ``M_student @ M_teacher^-1``)."""

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from components.data.box_transforms import (
    SemiSupervisedViews,
    View,
    ViewConfig,
    affine,
    affine_matrix,
    between_views,
    collate_views,
    hflip,
    hflip_matrix,
    identity_view,
    resize,
    scale_matrix,
    strong_view,
    transform_boxes,
    weak_view,
)


def scene(h=48, w=64):
    """A black image with two white rectangles and their exact boxes."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes = torch.tensor([[8.0, 10.0, 24.0, 30.0], [36.0, 6.0, 56.0, 20.0]])
    for x1, y1, x2, y2 in boxes.long().tolist():
        img[:, y1:y2, x1:x2] = 255
    return identity_view(img, boxes, torch.tensor([1, 2]))


def pixel_box(img: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Tight box of the bright pixels inside ``box`` (grown by 2 px)."""
    x1, y1, x2, y2 = box.tolist()
    mask = torch.zeros(img.shape[-2:], dtype=torch.bool)
    mask[max(0, int(y1) - 2) : int(y2) + 2, max(0, int(x1) - 2) : int(x2) + 2] = True
    ys, xs = torch.nonzero((img[0] > 127) & mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize(
    "matrix",
    [
        hflip_matrix(64),
        scale_matrix(1.5, 0.75),
        hflip_matrix(96) @ scale_matrix(1.5, 1.5),
        affine_matrix((32, 24), 0.0, (5, -3), 1.0, (0.0, 0.0)),  # translation
        affine_matrix((32, 24), 90.0, (0, 0), 1.0, (0.0, 0.0)),  # quarter turn keeps boxes axis-aligned
    ],
)
def test_round_trip_is_exact_for_axis_preserving_maps(matrix):
    boxes = torch.tensor([[8.0, 10.0, 24.0, 30.0], [36.5, 6.25, 56.0, 20.0]])
    back = transform_boxes(transform_boxes(boxes, matrix), torch.linalg.inv(matrix))
    assert torch.allclose(back, boxes, atol=1e-5)


def test_rotation_and_shear_round_trip_encloses_the_box():
    boxes = torch.tensor([[8.0, 10.0, 24.0, 30.0]])
    m = affine_matrix((32, 24), 20.0, (0, 0), 1.0, (10.0, -5.0))
    back = transform_boxes(transform_boxes(boxes, m), torch.linalg.inv(m))
    assert (back[:, :2] <= boxes[:, :2] + 1e-5).all() and (back[:, 2:] >= boxes[:, 2:] - 1e-5).all()
    assert (back[:, 2:] - back[:, :2] > boxes[:, 2:] - boxes[:, :2] + 1).all()  # the enclosing box grows


@pytest.mark.parametrize(
    "angle,translate,shear",
    [
        (25.0, (0, 0), (0.0, 0.0)),
        (0.0, (6, -4), (0.0, 0.0)),
        (0.0, (0, 0), (20.0, -15.0)),
        (-30.0, (3, 2), (10.0, 5.0)),
    ],
)
def test_affine_matrix_matches_torchvision_v2_boxes(angle, translate, shear):
    v = scene()
    ours = affine(v, angle=angle, translate=translate, shear=shear)
    theirs = TF.affine(
        tv_tensors.BoundingBoxes(v.boxes, format="XYXY", canvas_size=v.size),
        angle=angle,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
    )
    theirs = theirs.as_subclass(torch.Tensor)
    keep = ((theirs[:, 2:] - theirs[:, :2]) >= 1).all(1)
    assert torch.allclose(ours.boxes, theirs[keep], atol=1e-3)


def test_boxes_follow_the_pixels():
    v = scene()
    for op in (
        hflip,
        lambda x: resize(x, 1.5),
        lambda x: affine(x, translate=(5, -3)),
        lambda x: hflip(resize(x, 0.5)),
    ):
        out = op(v)
        assert out.boxes.shape == v.boxes.shape
        for box in out.boxes:
            assert torch.allclose(pixel_box(out.image, box), box, atol=1.01), (box, pixel_box(out.image, box))


def test_matrix_maps_original_coordinates_into_each_view():
    torch.manual_seed(0)
    v = scene()
    for _ in range(10):
        w = weak_view(v, resize_range=(0.5, 1.5), flip_p=0.5)
        assert torch.allclose(transform_boxes(v.boxes, w.matrix).float(), w.boxes, atol=1e-4)


def test_absolute_resize_draws_the_short_side_and_caps_the_long_side():
    """Soft Teacher's COCO recipe: short side 400-1200 px, long side <= 1333, whatever the image's own
    size; a 48 x 64 scene can reach at most 1333 * 48 / 64 = 999.75 px on its short side."""
    torch.manual_seed(0)
    v = scene()
    views = ViewConfig(short_side=(400, 1200), max_size=1333, flip_p=0.0)
    shorts = []
    for _ in range(30):
        w = views.weak(v)
        h_, w_ = w.size
        shorts.append(h_)
        assert 400 <= h_ <= 1000 and w_ <= 1333 and abs(w_ / h_ - 64 / 48) < 0.01
        assert torch.allclose(transform_boxes(v.boxes, w.matrix).float(), w.boxes, atol=1e-3)
    assert max(shorts) == 1000 and min(shorts) < 500  # capped draws and low draws both happen
    torch.manual_seed(0)
    assert weak_view(v, (0.5, 0.5), flip_p=0.0).size == (24, 32)  # without it: relative to the scene


def test_boxes_map_between_weak_and_strong_views():
    """Teacher-view boxes land on the student-view boxes through M_s @ M_t^-1."""
    torch.manual_seed(1)
    v = scene()
    for _ in range(10):
        t = weak_view(v, resize_range=(0.6, 1.4))
        s = hflip(resize(affine(v, translate=(4, 2)), float(torch.empty(()).uniform_(0.6, 1.4))))
        assert torch.allclose(transform_boxes(t.boxes, between_views(t.matrix, s.matrix)).float(), s.boxes, atol=1e-3)
        back = transform_boxes(s.boxes, between_views(s.matrix, t.matrix)).float()
        assert torch.allclose(back, t.boxes, atol=1e-3)


def test_strong_view_changes_pixels_and_keeps_a_consistent_matrix():
    torch.manual_seed(2)
    v = scene()
    s = strong_view(v, resize_range=(0.8, 1.2), rotate=0.0, shear=0.0)  # translate-only geometry: boxes exact
    assert s.image.dtype == torch.uint8 and s.image.shape[0] == 3
    mapped = transform_boxes(v.boxes, s.matrix).float()
    # boxes the translation pushed partly out of the canvas are clipped; the rest map exactly
    assert len(s.boxes) >= 1
    assert any(torch.allclose(b, m, atol=1e-3) for b in s.boxes for m in mapped)


def test_semi_supervised_views_batches_one_to_ratio():
    torch.manual_seed(3)
    v = scene()
    sample = (v.image.float() / 255, {"boxes": v.boxes, "labels": torch.tensor([7, 9])})
    ds = SemiSupervisedViews(
        [sample] * 3, [sample] * 5, {7: 1, 9: 2}, ratio=4, views=ViewConfig(resize_range=(0.8, 1.2))
    )
    batch = collate_views([ds[0], ds[1]])
    assert len(batch["labeled"]) == 2 and len(batch["weak"]) == len(batch["strong"]) == 8
    assert batch["targets"][0]["labels"].tolist() == [1, 2]  # category ids -> contiguous labels
    assert batch["labeled"][0].dtype == torch.float32 and batch["labeled"][0].max() <= 1
    for wm, sm in zip(batch["weak_matrix"], batch["strong_matrix"]):
        assert wm.shape == sm.shape == (3, 3)
    with pytest.raises(ValueError, match="needs unlabeled"):
        SemiSupervisedViews([sample], [], {7: 1, 9: 2}, ratio=4, views=ViewConfig())


def test_view_is_a_dataclass_with_size():
    v = scene()
    assert isinstance(v, View) and v.size == (48, 64)


def test_burn_in_epochs_load_the_labeled_view_only_and_the_same_one():
    """Epochs before ``unlabeled_from_epoch`` skip the unlabeled views (Soft Teacher's burn-in does not
    use them); the labeled view of a sample seed is the same with or without them."""
    from components.training.distributed import SeededDataset

    v = scene()
    sample = (v.image.float() / 255, {"boxes": v.boxes, "labels": torch.tensor([7, 9])})
    views = SemiSupervisedViews(
        [sample] * 3, [sample] * 5, {7: 1, 9: 2}, ratio=2, views=ViewConfig(), unlabeled_from_epoch=2
    )
    seeded = SeededDataset(views)
    burn_in, semi = seeded[(1, 1234, 1)], seeded[(1, 1234, 2)]
    assert "unlabeled" not in burn_in and len(semi["unlabeled"]) == 2
    assert torch.equal(burn_in["labeled"], semi["labeled"])
    assert "weak" not in collate_views([burn_in]) and len(collate_views([semi])["weak"]) == 2
