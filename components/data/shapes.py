"""The embedded default dataset: synthetic "shapes", generated deterministically from a seed.

Two tasks share one renderer:

* classification -- one shape per image (circle, square, triangle, star, cross, hexagon, ring,
  diamond) with random colour, size, rotation and position on a textured background (gradients,
  stripes, low-frequency noise, pixel noise). Small enough for a ViT at 32 px, not trivial: the
  background texture and colour never give the class away, only the outline does. The rotation is
  the main difficulty; ``rotation`` (a range of degrees, any angle by default) narrows it.
  ``style="silhouette"`` draws the same shapes as a flat gray silhouette on a flat gray background
  (one light and one dark level, either way round; no texture, colour or noise), so that nothing but
  the outline, its pose and two gray levels varies: without labels, colour and texture are what a
  small self-supervised ViT latches onto instead of the outline (README, iBOT).
* detection -- scenes with several shapes each, written as COCO instances JSON. Objects may overlap
  a little but every object keeps at least ``MIN_VISIBLE`` of its area visible; boxes are the tight
  box of the object's *visible* pixels (coverage >= 0.5), as COCO boxes are the box of the visible
  segmentation.

Every image has its own random stream ``np.random.default_rng([seed, task, split, *index])``, so an
image depends only on (seed, its index) -- not on how many others are drawn -- and the same
arguments always write byte-identical PNGs and JSON.

Shapes are rasterised with PIL at ``SUPERSAMPLE`` x resolution and box-filtered down, which gives
anti-aliased edges at 32 px for a fraction of a millisecond per image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "diamond")

SUPERSAMPLE = 4  # rasterise at 4x, then box-filter down (anti-aliasing)
MIN_VISIBLE = 0.7  # detection: each object keeps >= 70 % of its pixels visible
BOX_COVERAGE = 0.5  # a pixel belongs to an object's box when >= 50 % covered
MIN_COLOUR_DISTANCE = 120.0  # RGB distance between a shape and the background under it

FULL_TURN = (0.0, 360.0)  # the default rotation range, degrees: any orientation
STYLES = ("textured", "silhouette")  # classification images: see the module docstring
SILHOUETTE_LEVELS = ((170.0, 255.0), (0.0, 85.0))  # silhouette style: the light and the dark gray range

_TASK_CLS, _TASK_DET = 0, 1
_SPLITS = {"train": 0, "val": 1}


# --------------------------------------------------------------------------------------------
# Geometry: each shape is a list of (polygon in unit coordinates, fill) drawn in order; fill 0
# cuts a hole (the ring). The unit circle is the shape's circumscribed circle.
# --------------------------------------------------------------------------------------------
def _regular(n: int, phase: float = 0.0, radius: float = 1.0) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        (
            (1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * k / points),
            (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * k / points),
        )
        for k in range(2 * points)
    ]


def _cross(arm: float = 0.32) -> list[tuple[float, float]]:
    a, b = arm, math.sqrt(1.0 - arm * arm)  # arm corners touch the unit circle
    return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]


SHAPE_OUTLINES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_regular(48), 255)],
    "square": [(_regular(4, math.pi / 4), 255)],
    "triangle": [(_regular(3, -math.pi / 2), 255)],
    "star": [(_star(), 255)],
    "cross": [(_cross(), 255)],
    "hexagon": [(_regular(6), 255)],
    "ring": [(_regular(48), 255), (_regular(48, radius=0.55), 0)],
    # an elongated rhombus: a rotated square is still a square, so the diamond differs in aspect
    "diamond": [([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)], 255)],
}


def render_shape_alpha(
    name: str, cx: float, cy: float, radius: float, angle: float, height: int, width: int
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of shape ``name`` centred at (cx, cy) on an HxW canvas."""
    if name not in SHAPE_OUTLINES:
        raise ValueError(f"unknown shape class {name!r}; known: {', '.join(SHAPE_OUTLINES)}")
    x0, y0 = max(int(math.floor(cx - radius)) - 1, 0), max(int(math.floor(cy - radius)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + radius)) + 1, width), min(int(math.ceil(cy + radius)) + 1, height)
    s = SUPERSAMPLE
    patch = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(patch)
    c, si = math.cos(angle), math.sin(angle)
    for poly, fill in SHAPE_OUTLINES[name]:
        pts = [((cx + radius * (u * c - v * si) - x0) * s, (cy + radius * (u * si + v * c) - y0) * s) for u, v in poly]
        draw.polygon(pts, fill=fill)
    small = patch.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    alpha = np.zeros((height, width), np.float32)
    alpha[y0:y1, x0:x1] = np.asarray(small, np.float32) / 255.0  # [h, w]
    return alpha


# --------------------------------------------------------------------------------------------
# Backgrounds and colours
# --------------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background [H, W, 3] float in [0, 255]: gradient, stripes or smooth noise, plus pixel noise."""
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == 0:  # linear gradient in a random direction
        th = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(th) + (yy - 0.5) * math.sin(th)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # stripes (soft or hard) at a random angle and frequency
        th = rng.uniform(0, math.pi)
        freq = rng.uniform(2.0, 6.0)
        t = 0.5 + 0.5 * np.sin(
            2 * math.pi * freq * (xx * math.cos(th) + yy * math.sin(th)) + rng.uniform(0, 2 * math.pi)
        )
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
        c1 = c0 + (c1 - c0) * rng.uniform(0.15, 0.45)  # keep stripes lower-contrast than the shapes
    else:  # smooth noise: a coarse random grid upsampled bicubically
        g = int(rng.integers(3, 6))
        coarse = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0
    bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]  # [H, W, 3]
    return bg.astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least ``MIN_COLOUR_DISTANCE`` from ``under`` (else the farthest of the draws)."""
    best, best_d = None, -1.0
    for _ in range(12):
        col = _random_colour(rng)
        d = float(np.linalg.norm(col - under))
        if d >= MIN_COLOUR_DISTANCE:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Composite ``colour``, shaded by a +-15 % linear ramp across the shape, over ``img`` [H, W, 3] in place."""
    th = rng.uniform(0, 2 * math.pi)
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if len(rows) == 0:
        return
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    a = alpha[ys, xs, None]  # [h, w, 1]: only the shape's bounding patch is touched
    h, w = a.shape[:2]
    yy = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    shade = 1.0 + 0.15 * (math.sin(th) * yy + math.cos(th) * xx)  # [h, w]
    fg = np.clip(colour[None, None, :] * shade[..., None], 0, 255)
    patch = img[ys, xs]
    patch *= 1 - a
    patch += fg * a


def _finish(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    sigma = rng.uniform(0.0, 6.0)
    img = img + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _save_png(img: Image.Image, path: Path) -> None:
    """PNG without metadata (byte-identical for identical pixels), written to a temp name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", compress_level=1)  # noisy pixels barely compress; level 1 is 4x faster
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------
def draw_shape(name: str, image_size: int, rng: np.random.Generator, rotation: tuple[float, float]) -> np.ndarray:
    """Coverage [H, W] of one shape fully inside the image, radius 22-42 % of the image side, rotated by
    an angle drawn from ``rotation`` (degrees)."""
    r = rng.uniform(0.22, 0.42) * image_size
    cx, cy = rng.uniform(r + 0.5, image_size - r - 0.5, size=2)
    return render_shape_alpha(name, cx, cy, r, draw_rotation(rng, rotation), image_size, image_size)


def render_classification_image(
    name: str,
    image_size: int,
    rng: np.random.Generator,
    rotation: tuple[float, float] = FULL_TURN,
    style: str = "textured",
) -> Image.Image:
    """One shape (``draw_shape``; any angle by default) in one of the ``STYLES``."""
    _check_style(style)
    if style == "silhouette":
        return render_silhouette(name, image_size, rng, rotation)
    bg = render_background(rng, image_size, image_size)
    alpha = draw_shape(name, image_size, rng, rotation)
    under = (bg * alpha[..., None]).sum((0, 1)) / max(float(alpha.sum()), 1e-6)
    _paint(bg, alpha, _contrasting_colour(rng, under), rng)
    return _finish(bg, rng)


def render_silhouette(
    name: str, image_size: int, rng: np.random.Generator, rotation: tuple[float, float] = FULL_TURN
) -> Image.Image:
    """The silhouette style: the shape at one gray level over a flat background at another, one light
    and one dark (``SILHOUETTE_LEVELS``), light-on-dark or dark-on-light with equal odds."""
    alpha = draw_shape(name, image_size, rng, rotation)  # [H, W]
    fg, bg = (rng.uniform(lo, hi) for lo, hi in SILHOUETTE_LEVELS)
    if rng.random() < 0.5:
        fg, bg = bg, fg
    gray = bg + (fg - bg) * alpha  # [H, W]
    return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L").convert("RGB")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def _check_rotation(rotation) -> tuple[float, float]:
    lo, hi = (float(v) for v in rotation)
    if not 0.0 <= lo <= hi <= 360.0:
        raise ValueError(
            f"rotation must be a range [lo, hi] of degrees with 0 <= lo <= hi <= 360, got {list(rotation)}"
        )
    return lo, hi


def draw_rotation(rng: np.random.Generator, rotation: tuple[float, float] = FULL_TURN) -> float:
    """A shape's rotation in radians, uniform in ``rotation`` (degrees). One draw from ``rng`` whatever
    the range, so narrowing it changes the orientations and nothing else in an image."""
    lo, hi = rotation
    return math.radians(lo) + rng.uniform(0, 2 * math.pi) * (hi - lo) / 360.0


def _check_counts(**kw: int) -> None:
    for k, v in kw.items():
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{k} must be a non-negative integer, got {v!r}")


def write_shapes_classification(
    out_dir,
    image_size: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    classes=SHAPE_CLASSES,
    rotation: tuple[float, float] = FULL_TURN,
    style: str = "textured",
) -> dict:
    """Write ``out_dir/images/{train,val}/<class>/<class>_<i>.png`` and return the index dict.

    The index follows the data contract: {"source", "classes", "image_size", "train": [[path, label]],
    "val": [...]}, paths relative to ``out_dir``; the caller writes it as index.json.
    """
    _check_counts(image_size=image_size, train_per_class=train_per_class, val_per_class=val_per_class)
    rotation = _check_rotation(rotation)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    classes = list(classes)
    for c in classes:
        if c not in SHAPE_OUTLINES:
            raise ValueError(f"unknown shape class {c!r}; known: {', '.join(SHAPE_OUTLINES)}")
    out_dir = Path(out_dir)
    index: dict = {"source": "shapes", "classes": classes, "image_size": int(image_size), "train": [], "val": []}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(classes):
            for i in range(per_class):
                rng = np.random.default_rng([seed, _TASK_CLS, _SPLITS[split], SHAPE_CLASSES.index(name), i])
                rel = f"images/{split}/{name}/{name}_{i:05d}.png"
                _save_png(render_classification_image(name, image_size, rng, rotation, style), out_dir / rel)
                index[split].append([rel, label])
    return index


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------
def _tight_box(coverage: np.ndarray) -> list[int] | None:
    """COCO [x, y, w, h] (pixel edges) of pixels with coverage >= BOX_COVERAGE, or None if empty."""
    ys, xs = np.nonzero(coverage >= BOX_COVERAGE)
    if len(xs) == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def render_detection_scene(
    image_size: int,
    num_objects: int,
    classes: list[str],
    rng: np.random.Generator,
    max_tries: int = 60,
    rotation: tuple[float, float] = FULL_TURN,
) -> tuple[Image.Image, list[dict]]:
    """A scene with up to ``num_objects`` shapes; returns the image and [{"label", "bbox", "area", "visible"}].

    Shapes have radius 6-20 % of the side and lie fully inside the image. A placement is rejected when
    it would leave any earlier object with less than ``MIN_VISIBLE`` of its own area visible
    ("visible" is that fraction at the end; "area" the count of pixels at least half covered).
    """
    bg = render_background(rng, image_size, image_size)
    visible: list[np.ndarray] = []  # per object: coverage still visible  [H, W]
    full_area: list[float] = []
    labels: list[int] = []
    min_r = max(0.06 * image_size, 3.0)
    max_r = max(0.20 * image_size, min_r + 1.0)
    for _ in range(num_objects):
        for _try in range(max_tries):
            label = int(rng.integers(0, len(classes)))
            r = rng.uniform(min_r, max_r)
            cx, cy = rng.uniform(r + 0.5, image_size - r - 0.5, size=2)
            alpha = render_shape_alpha(classes[label], cx, cy, r, draw_rotation(rng, rotation), image_size, image_size)
            keep = 1.0 - alpha
            if all(float((v * keep).sum()) >= MIN_VISIBLE * a for v, a in zip(visible, full_area)):
                break
        else:
            continue  # scene too crowded for another object
        under = (bg * alpha[..., None]).sum((0, 1)) / max(float(alpha.sum()), 1e-6)
        _paint(bg, alpha, _contrasting_colour(rng, under), rng)
        visible = [v * keep for v in visible] + [alpha]
        full_area.append(float(alpha.sum()))
        labels.append(label)
    objects = []
    for label, v, a in zip(labels, visible, full_area):
        box = _tight_box(v)
        if box is not None:
            objects.append(
                {"label": label, "bbox": box, "area": int((v >= BOX_COVERAGE).sum()), "visible": float(v.sum()) / a}
            )
    return _finish(bg, rng), objects


def write_shapes_detection(
    out_dir,
    image_size: int,
    num_train: int,
    num_val: int,
    min_objects: int,
    max_objects: int,
    seed: int,
    classes=SHAPE_CLASSES,
    rotation: tuple[float, float] = FULL_TURN,
) -> tuple[dict, dict]:
    """Write scenes to ``out_dir/images/{train,val}/<id>.png``; return (train_coco, val_coco).

    COCO instances dicts: ``images`` (id from 1, file_name, width, height), ``categories`` (id = class
    index + 1, name, supercategory "shape"), ``annotations`` (id, image_id, category_id, bbox [x, y, w, h]
    in pixels, area = visible pixel count, iscrowd 0), ``info.image_root`` = "images/<split>".
    """
    _check_counts(
        image_size=image_size, num_train=num_train, num_val=num_val, min_objects=min_objects, max_objects=max_objects
    )
    rotation = _check_rotation(rotation)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for detection scenes, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    classes = list(classes)
    for c in classes:
        if c not in SHAPE_OUTLINES:
            raise ValueError(f"unknown shape class {c!r}; known: {', '.join(SHAPE_OUTLINES)}")
    out_dir = Path(out_dir)
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)]
    result = []
    for split, n in (("train", num_train), ("val", num_val)):
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, _TASK_DET, _SPLITS[split], i])
            k = int(rng.integers(min_objects, max_objects + 1))
            img, objects = render_detection_scene(image_size, k, classes, rng, rotation=rotation)
            image_id = i + 1
            file_name = f"{image_id:06d}.png"
            _save_png(img, out_dir / "images" / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for obj in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj["label"] + 1,
                        "bbox": obj["bbox"],
                        "area": obj["area"],
                        "iscrowd": 0,
                    }
                )
        result.append(
            {
                "info": {
                    "description": f"synthetic shapes scenes ({split})",
                    "version": "1",
                    "seed": int(seed),
                    "image_root": f"images/{split}",
                },
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
        )
    return result[0], result[1]
