"""The synthetic shapes data: deterministic from the seed, balanced, valid COCO with tight boxes."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from components.data import shapes
from components.data.shapes import (
    MIN_VISIBLE,
    SHAPE_CLASSES,
    render_shape_alpha,
    write_shapes_classification,
    write_shapes_detection,
)
from components.data.sources import validate_coco


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_classification_is_byte_identical_for_a_seed_and_differs_for_another(tmp_path):
    a = write_shapes_classification(tmp_path / "a", 32, 2, 1, seed=3)
    b = write_shapes_classification(tmp_path / "b", 32, 2, 1, seed=3)
    c = write_shapes_classification(tmp_path / "c", 32, 2, 1, seed=4)
    assert a == b == c  # same file names and labels ...
    da, db, dc = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert da == db  # ... same bytes for the same seed
    assert all(da[k] != dc[k] for k in da)  # every image changes with the seed


def test_classification_counts_classes_and_contract(tmp_path):
    index = write_shapes_classification(tmp_path, 32, 3, 2, seed=0)
    assert index["source"] == "shapes" and index["image_size"] == 32
    assert index["classes"] == list(SHAPE_CLASSES) and len(SHAPE_CLASSES) >= 6
    assert len(index["train"]) == 3 * len(SHAPE_CLASSES) and len(index["val"]) == 2 * len(SHAPE_CLASSES)
    for split, per_class in (("train", 3), ("val", 2)):
        labels = [label for _, label in index[split]]
        assert all(labels.count(k) == per_class for k in range(len(SHAPE_CLASSES)))
        for rel, label in index[split]:
            assert not Path(rel).is_absolute() and f"/{SHAPE_CLASSES[label]}/" in rel
            with Image.open(tmp_path / rel) as im:
                assert im.mode == "RGB" and im.size == (32, 32)
    # an image depends on (seed, class, index) only, not on how many were drawn
    more = write_shapes_classification(tmp_path / "more", 32, 5, 0, seed=0)
    rel = index["train"][1][0]
    assert (tmp_path / rel).read_bytes() == (tmp_path / "more" / rel).read_bytes()
    assert len(more["train"]) == 5 * len(SHAPE_CLASSES) and more["val"] == []


def test_classification_images_are_not_constant_and_differ_between_classes(tmp_path):
    index = write_shapes_classification(tmp_path, 32, 1, 0, seed=1)
    arrays = [np.asarray(Image.open(tmp_path / rel), np.float32) for rel, _ in index["train"]]
    assert all(a.std() > 5 for a in arrays)  # textured, with a shape on it
    assert len({a.tobytes() for a in arrays}) == len(arrays)


def test_silhouette_style_is_the_shape_at_one_gray_level_on_a_flat_other(tmp_path):
    """style="silhouette": gray pixels; a flat background at one level, the shape at the other, one
    light (170-255) and one dark (0-85), both ways round; the same seed gives the same bytes."""
    index = write_shapes_classification(tmp_path / "a", 32, 4, 0, seed=2, style="silhouette")
    write_shapes_classification(tmp_path / "b", 32, 4, 0, seed=2, style="silhouette")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    textured = write_shapes_classification(tmp_path / "t", 32, 4, 0, seed=2)
    assert index == textured  # the same file names and labels as the textured style
    light_shapes = 0
    for rel, _ in index["train"]:
        rgb = np.asarray(Image.open(tmp_path / "a" / rel), np.float32)  # [32, 32, 3]
        assert (rgb == rgb[..., :1]).all()  # gray
        gray = rgb[..., 0]
        bg = gray[0, 0]
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        assert (border == bg).mean() > 0.5  # the shape touches at most part of the border
        far = gray.flat[np.abs(gray - bg).argmax()]  # a pixel inside the shape
        assert 0 <= min(bg, far) <= 85 and 170 <= max(bg, far) <= 255, (rel, bg, far)
        inside = np.abs(gray - bg) > 0.5 * abs(far - bg)
        assert 0.05 < inside.mean() < 0.6, (rel, inside.mean())  # one shape, radius 22-42 % of the side
        light_shapes += int(far > bg)
    assert 0 < light_shapes < len(index["train"])  # both ways round


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_shape_masks_are_distinct_and_inside_their_circle(name):
    alpha = render_shape_alpha(name, 32.0, 32.0, 24.0, 0.3, 64, 64)  # [64, 64]
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    outside = np.hypot(xx - 32, yy - 32) > 24 + 1.5
    assert alpha.min() >= 0 and alpha.max() <= 1 and alpha[outside].max() == 0
    assert alpha.sum() > 0.25 * math.pi * 24**2  # a filled shape, not a sliver
    others = [render_shape_alpha(o, 32.0, 32.0, 24.0, 0.3, 64, 64) for o in SHAPE_CLASSES if o != name]
    assert all(np.abs(alpha - o).sum() > 40 for o in others)  # every class has its own outline


def test_detection_is_valid_coco_with_tight_boxes(tmp_path):
    train, val = write_shapes_detection(tmp_path, 64, 6, 2, 2, 4, seed=0)
    assert train["info"]["image_root"] == "images/train" and val["info"]["image_root"] == "images/val"
    assert [c["name"] for c in train["categories"]] == list(SHAPE_CLASSES)
    for coco, split, n in ((train, "train", 6), (val, "val", 2)):
        assert len(coco["images"]) == n
        cleaned, skipped = validate_coco(coco, split, image_dir=tmp_path / "images" / split, check_images=True)
        assert cleaned["annotations"] == coco["annotations"] and not any(skipped.values())
        ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ids)) == len(ids)
        per_image = {im["id"]: 0 for im in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
            per_image[a["image_id"]] += 1
        assert all(2 <= k <= 4 for k in per_image.values())
        api = COCO()
        api.dataset = coco
        api.createIndex()
        assert len(api.getAnnIds()) == len(coco["annotations"]) and len(api.getCatIds()) == len(SHAPE_CLASSES)


def test_detection_boxes_are_tight_around_the_visible_pixels(monkeypatch):
    """On a black, noise-free canvas every lit pixel lies in a box and every box edge touches its shape."""
    monkeypatch.setattr(shapes, "render_background", lambda rng, h, w: np.zeros((h, w, 3), np.float32))
    monkeypatch.setattr(shapes, "_finish", lambda img, rng: Image.fromarray(np.rint(img).astype(np.uint8), "RGB"))
    for k in range(4):
        img, objects = shapes.render_detection_scene(64, 4, list(SHAPE_CLASSES), np.random.default_rng(k))
        pixels = np.asarray(img).max(axis=2)  # [H, W]
        lit = pixels > 40  # mostly covered by some shape
        inside = np.zeros_like(lit)
        assert objects
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            inside[y : y + h, x : x + w] = True
            box = pixels[y : y + h, x : x + w] > 0
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        # faint anti-aliased fringes (< 50 % coverage) may sit one pixel outside a box
        grown = inside.copy()
        grown[1:] |= inside[:-1]
        grown[:-1] |= inside[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:].copy()
        assert not (lit & ~grown).any()


def test_crowded_scenes_keep_every_object_mostly_visible():
    for k in range(3):
        _, objects = shapes.render_detection_scene(64, 8, list(SHAPE_CLASSES), np.random.default_rng(k))
        assert len(objects) >= 3
        assert all(obj["visible"] >= MIN_VISIBLE - 1e-6 for obj in objects)


def test_detection_is_deterministic(tmp_path):
    a = write_shapes_detection(tmp_path / "a", 64, 3, 1, 3, 5, seed=2)
    b = write_shapes_detection(tmp_path / "b", 64, 3, 1, 3, 5, seed=2)
    c = write_shapes_detection(tmp_path / "c", 64, 3, 1, 3, 5, seed=9)
    assert a == b and a != c
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_bad_generator_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_objects"):
        write_shapes_detection(tmp_path, 64, 1, 1, 3, 2, seed=0)
    with pytest.raises(ValueError, match="unknown shape class"):
        write_shapes_classification(tmp_path, 32, 1, 1, seed=0, classes=("circle", "blob"))
    with pytest.raises(ValueError, match="train_per_class"):
        write_shapes_classification(tmp_path, 32, -1, 1, seed=0)
    with pytest.raises(ValueError, match="rotation"):
        write_shapes_classification(tmp_path, 32, 1, 1, seed=0, rotation=(90, 45))
    with pytest.raises(ValueError, match="rotation"):
        write_shapes_detection(tmp_path, 64, 1, 1, 1, 2, seed=0, rotation=(0, 400))
    with pytest.raises(ValueError, match="style"):
        write_shapes_classification(tmp_path, 32, 1, 1, seed=0, style="glossy")


def test_rotation_range_sets_each_shapes_angle_and_only_that(tmp_path, monkeypatch):
    """The default range keeps the stream that wrote the data so far; a narrower one draws the same
    number of random values, so a classification image keeps its shape's position, size and colour
    (a scene may place later objects differently when a new orientation changes which placements overlap)."""
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [shapes.draw_rotation(a) for _ in range(5)] == [b.uniform(0, 2 * math.pi) for _ in range(5)]
    draws = [shapes.draw_rotation(np.random.default_rng(i), (10, 20)) for i in range(50)]
    assert all(math.radians(10) <= d <= math.radians(20) for d in draws) and len(set(draws)) == 50

    calls: dict[str, list] = {}

    def recording(tag):
        def render(name, cx, cy, radius, angle, h, w):
            calls.setdefault(tag, []).append((name, round(cx, 6), round(cy, 6), round(radius, 6), angle))
            return render_shape_alpha(name, cx, cy, radius, angle, h, w)

        return render

    for tag, rotation in (("any", shapes.FULL_TURN), ("upright", (0, 0))):
        monkeypatch.setattr(shapes, "render_shape_alpha", recording(f"{tag}_cls"))
        write_shapes_classification(tmp_path / tag / "cls", 32, 2, 1, seed=0, rotation=rotation)
        monkeypatch.setattr(shapes, "render_shape_alpha", recording(f"{tag}_det"))
        write_shapes_detection(tmp_path / tag / "det", 64, 2, 1, 2, 4, seed=0, rotation=rotation)
    assert all(c[-1] == 0.0 for c in calls["upright_cls"] + calls["upright_det"])
    rotated = calls["any_cls"] + calls["any_det"]
    assert len({c[-1] for c in rotated}) == len(rotated)
    assert [c[:-1] for c in calls["upright_cls"]] == [c[:-1] for c in calls["any_cls"]]  # same shapes, same places


def test_contact_sheet_draws_boxes_in_class_colours_and_titles(tmp_path):
    from components.data.visualize import class_colour, coco_sheet, contact_sheet
    from pipelines.layout import write_figure

    images = [Image.new("RGB", (32, 32), (0, 0, 0)) for _ in range(5)]
    boxes = [[[8, 8, 24, 24]]] + [[] for _ in range(4)]
    labels = [["star"]] + [[] for _ in range(4)]
    sheet = contact_sheet(
        images,
        boxes,
        labels,
        titles=[f"#{i}" for i in range(5)],
        cols=3,
        tile=64,
        pad=4,
        class_names=["circle", "star"],
    )
    assert sheet.size == (3 * 68 + 4, 2 * (68 + 16) + 4)
    # the box's bottom edge, scaled x2 and placed in cell 0 (offset 4 px), is drawn in the colour of class 1
    px = np.asarray(sheet)[4 + 2 * 24 - 1, 4 + 2 * 16]
    assert tuple(px) == class_colour("star", 1)
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        contact_sheet(images, titles=["a", "b"])

    train, _ = write_shapes_detection(tmp_path, 64, 2, 0, 1, 3, seed=0)
    out = write_figure(coco_sheet(train, tmp_path / "images" / "train", cols=2, tile=96), tmp_path / "sheet.png")
    with Image.open(out) as im:
        assert im.size[0] == 2 * (96 + 6) + 6
