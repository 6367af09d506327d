"""Box-aware views for Soft Teacher: a weak view for the teacher, a strong view for the student.

Soft Teacher (Xu et al. 2021, Sec. 3 and the official ``configs/soft_teacher/base.py``) gives the
teacher a weak view of each unlabeled image (random resize + horizontal flip) and the student a strong
view of the same image (random resize + flip, one colour op, one geometric op among translate,
rotate and shear, then 1-5 random erases). Each view records the 3x3 matrix ``M`` that maps
original-image coordinates to view coordinates, so boxes move between two views of one image with
``M_student @ M_teacher^-1`` (:func:`between_views`).

Images are uint8 [3, H, W] tensors until :func:`to_float`; pixel ops are torchvision transforms v2
functionals, and each geometric op builds the same forward matrix torchvision applies to boxes.
Randomness comes from the global torch RNG (the data loader seeds it per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
from torchvision.transforms.v2 import functional as F


@dataclass
class View:
    """One view of an image and its boxes; ``matrix`` maps original-image to view coordinates."""

    image: torch.Tensor  # [3, H, W] uint8 (float after to_float)
    boxes: torch.Tensor  # [N, 4] xyxy, view coordinates
    labels: torch.Tensor  # [N]
    matrix: torch.Tensor  # [3, 3] float64

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # (H, W)


def identity_view(image: torch.Tensor, boxes: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> View:
    boxes = torch.zeros(0, 4) if boxes is None else boxes.float().reshape(-1, 4)
    labels = torch.zeros(0, dtype=torch.int64) if labels is None else labels.long()
    return View(image, boxes, labels, torch.eye(3, dtype=torch.float64))


# --------------------------------------------------------------------------- matrices and boxes
def scale_matrix(sx: float, sy: float) -> torch.Tensor:
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def hflip_matrix(width: int) -> torch.Tensor:
    """x -> W - x (pixel i covers [i, i + 1), so it lands on [W - 1 - i, W - i])."""
    return torch.tensor([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def affine_matrix(
    center: tuple[float, float], angle: float, translate: tuple[float, float], scale: float, shear: tuple[float, float]
) -> torch.Tensor:
    """torchvision's forward affine ``T * C * R(a) S(s) SHy(sy) SHx(sx) * C^-1`` (degrees, pixels)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    cx, cy = center
    rss = torch.tensor([[a * scale, b * scale, 0.0], [c * scale, d * scale, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    to_c = torch.tensor(
        [[1.0, 0.0, cx + translate[0]], [0.0, 1.0, cy + translate[1]], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    from_c = torch.tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return to_c @ rss @ from_c


def transform_boxes(boxes: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Map xyxy boxes [N, 4] through a 3x3 matrix: the box enclosing the four mapped corners."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    x1, y1, x2, y2 = boxes.double().unbind(-1)
    corners = torch.stack(
        [torch.stack([x1, y1], -1), torch.stack([x2, y1], -1), torch.stack([x2, y2], -1), torch.stack([x1, y2], -1)], 1
    )  # [N, 4, 2]
    m = matrix.to(device=boxes.device, dtype=torch.float64)
    mapped = corners @ m[:2, :2].T + m[:2, 2]  # [N, 4, 2]
    if not torch.equal(m[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=m.device)):
        w = corners @ m[2, :2] + m[2, 2]  # [N, 4] projective row
        mapped = mapped / w.unsqueeze(-1)
    return torch.cat([mapped.amin(1), mapped.amax(1)], dim=-1).to(boxes.dtype)  # [N, 4]


def between_views(src_matrix: torch.Tensor, dst_matrix: torch.Tensor) -> torch.Tensor:
    """The matrix that maps ``src`` view coordinates to ``dst`` view coordinates: M_dst @ M_src^-1."""
    return dst_matrix.double() @ torch.linalg.inv(src_matrix.double())


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int], min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip boxes to an (H, W) canvas; returns (clipped boxes, mask of those at least ``min_size`` wide and high)."""
    h, w = size
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    keep = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    return out, keep


def larger_than(boxes: torch.Tensor, min_size: float = 0.0) -> torch.Tensor:
    """Mask of the boxes wider and higher than ``min_size`` (strictly): Soft Teacher's ``filter_invalid``
    rule for pseudo boxes, whose default ``min_pseduo_box_size = 0`` keeps any box of positive size."""
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def _move(view: View, image: torch.Tensor, step: torch.Tensor) -> View:
    """The view after a geometric op: new image, boxes mapped by ``step`` and clipped, matrix updated."""
    boxes, keep = clip_boxes(transform_boxes(view.boxes, step), tuple(image.shape[-2:]))
    return View(image, boxes[keep], view.labels[keep], step @ view.matrix)


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()))


# --------------------------------------------------------------------------- geometric ops
def resize(view: View, scale: float) -> View:
    h, w = view.size
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.resize(view.image, [nh, nw], antialias=True)
    return _move(view, image, scale_matrix(nw / w, nh / h))


def random_resize(
    view: View, scale_range: tuple[float, float], short_side: tuple[int, int] | None = None, max_size: int | None = None
) -> View:
    """Soft Teacher's RandResize. With ``short_side``: the short side drawn from that range in pixels and
    the long side capped at ``max_size`` (keep-ratio, mmdetection's rescale; the official COCO recipe
    draws 400-1200 and tests at 800), so every image trains at the scale the test resize gives it.
    Without: a factor drawn from ``scale_range``, relative to the scene's own size."""
    drawn = _uniform(*(short_side or scale_range))  # one draw either way: a factor, or a short side in px
    if short_side is None:
        return resize(view, drawn)
    h, w = view.size
    scale = drawn / min(h, w)
    if max_size is not None:
        scale = min(scale, max_size / max(h, w))
    return resize(view, scale)


def hflip(view: View) -> View:
    return _move(view, F.horizontal_flip(view.image), hflip_matrix(view.size[1]))


def random_hflip(view: View, p: float = 0.5) -> View:
    return hflip(view) if float(torch.rand(())) < p else view


def affine(
    view: View,
    angle: float = 0.0,
    translate: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    shear: tuple[float, float] = (0.0, 0.0),
) -> View:
    """torchvision v2 affine about the image centre; empty pixels are filled with 0."""
    h, w = view.size
    image = F.affine(view.image, angle=angle, translate=list(translate), scale=scale, shear=list(shear))
    return _move(view, image, affine_matrix((w * 0.5, h * 0.5), angle, translate, scale, shear))


def random_geometric(view: View, translate: float = 0.1, rotate: float = 30.0, shear: float = 30.0) -> View:
    """One of: translate x or y (fraction of the size), rotate (degrees), shear x then y (degrees)."""
    h, w = view.size
    op = int(torch.randint(4, ()))
    if op == 0:
        return affine(view, translate=(round(_uniform(-translate, translate) * w), 0))
    if op == 1:
        return affine(view, translate=(0, round(_uniform(-translate, translate) * h)))
    if op == 2:
        return affine(view, angle=_uniform(-rotate, rotate))
    return affine(view, shear=(_uniform(-shear, shear), _uniform(-shear, shear)))


# --------------------------------------------------------------------------- photometric ops
def random_colour(view: View) -> View:
    """One of identity, AutoContrast, Equalize, Solarize, Color, Contrast, Brightness, Sharpness, Posterize."""
    img = view.image
    op = int(torch.randint(9, ()))
    ops = [
        lambda: img,
        lambda: F.autocontrast(img),
        lambda: F.equalize(img),
        lambda: F.solarize(img, threshold=int(_uniform(0, 256))),
        lambda: F.adjust_saturation(img, _uniform(0.05, 1.95)),
        lambda: F.adjust_contrast(img, _uniform(0.05, 1.95)),
        lambda: F.adjust_brightness(img, _uniform(0.05, 1.95)),
        lambda: F.adjust_sharpness(img, _uniform(0.05, 1.95)),
        lambda: F.posterize(img, bits=int(torch.randint(4, 9, ()))),
    ]
    return replace(view, image=ops[op]())


def random_erase(view: View, n_range: tuple[int, int] = (1, 5), max_size: float = 0.2) -> View:
    """1-5 square patches of side up to ``max_size`` of the shorter side, filled with 0 (boxes unchanged)."""
    h, w = view.size
    img = view.image.clone()
    for _ in range(int(torch.randint(n_range[0], n_range[1] + 1, ()))):
        side = max(1, round(_uniform(0, max_size) * min(h, w)))
        y, x = int(torch.randint(0, h - side + 1, ())), int(torch.randint(0, w - side + 1, ()))
        img[:, y : y + side, x : x + side] = 0
    return replace(view, image=img)


# --------------------------------------------------------------------------- the two views
def weak_view(
    view: View,
    resize_range: tuple[float, float] = (1.0, 1.0),
    flip_p: float = 0.5,
    short_side: tuple[int, int] | None = None,
    max_size: int | None = None,
) -> View:
    """The teacher's view: random resize + horizontal flip."""
    return random_hflip(random_resize(view, resize_range, short_side, max_size), flip_p)


def strong_view(
    view: View,
    resize_range: tuple[float, float] = (1.0, 1.0),
    flip_p: float = 0.5,
    translate: float = 0.1,
    rotate: float = 30.0,
    shear: float = 30.0,
    erase_n: tuple[int, int] = (1, 5),
    erase_size: float = 0.2,
    short_side: tuple[int, int] | None = None,
    max_size: int | None = None,
    colour: bool = True,
) -> View:
    """The student's view: the weak ops, then a colour op (``colour``) and a geometric op in random order, then
    erases."""
    view = weak_view(view, resize_range, flip_p, short_side, max_size)
    geometric = partial(random_geometric, translate=translate, rotate=rotate, shear=shear)
    ops = [random_colour, geometric] if colour else [geometric]
    if colour and float(torch.rand(())) < 0.5:  # ShuffledSequential in the official pipeline
        ops.reverse()
    for op in ops:
        view = op(view)
    return random_erase(view, erase_n, erase_size)


def to_float(view: View) -> View:
    """uint8 [3, H, W] -> float32 in [0, 1] (torchvision's detectors normalise internally)."""
    return replace(view, image=F.to_dtype(view.image, torch.float32, scale=True))


# --------------------------------------------------------------------------- datasets of views
@dataclass(frozen=True)
class ViewConfig:
    """Augmentation strengths of the two views (Soft Teacher's weak and strong pipelines)."""

    resize_range: tuple[float, float] = (1.0, 1.0)
    flip_p: float = 0.5
    translate: float = 0.1
    rotate: float = 30.0
    shear: float = 30.0
    erase_n: tuple[int, int] = (1, 5)
    erase_size: float = 0.2
    short_side: tuple[int, int] | None = None  # absolute resize (see random_resize); None: resize_range
    max_size: int | None = None
    colour: bool = True  # one colour op on the labeled and strong views (the official pipeline)

    def weak(self, view: View) -> View:
        """The teacher's view of an unlabeled image."""
        return to_float(weak_view(view, self.resize_range, self.flip_p, self.short_side, self.max_size))

    def labeled(self, view: View) -> View:
        """Labeled images: the weak view plus one colour op (the official supervised pipeline; ``colour``)."""
        weak = weak_view(view, self.resize_range, self.flip_p, self.short_side, self.max_size)
        return to_float(random_colour(weak) if self.colour else weak)

    def strong(self, view: View) -> View:
        """The student's view of an unlabeled image."""
        return to_float(
            strong_view(
                view,
                self.resize_range,
                self.flip_p,
                self.translate,
                self.rotate,
                self.shear,
                self.erase_n,
                self.erase_size,
                self.short_side,
                self.max_size,
                self.colour,
            )
        )


def _as_view(image: torch.Tensor, target: dict, category_to_label: dict[int, int]) -> View:
    """A (float [3, H, W] in [0, 1], COCO target) sample as a uint8 view with contiguous labels 1..C."""
    img = image.mul(255).round().clamp(0, 255).to(torch.uint8) if image.is_floating_point() else image
    labels = torch.tensor([category_to_label[int(c)] for c in target["labels"].tolist()], dtype=torch.int64)
    return identity_view(img, torch.as_tensor(target["boxes"]).float(), labels)


class SemiSupervisedViews(torch.utils.data.Dataset):
    """Item ``i``: labeled image ``i`` (weak view + a colour op) with its boxes, plus ``ratio`` unlabeled images
    (drawn with the sample's RNG) each as a (weak, strong) pair with both transform matrices.

    One epoch is one pass over the labeled images; with ``ratio = 0`` (or no unlabeled set) items are
    the supervised baseline's. Epochs before ``unlabeled_from_epoch`` (burn-in: the step function does not
    use the unlabeled images) carry the labeled view only, the same view as later (it is drawn first).
    Items are dicts; :func:`collate_views` batches them into lists.
    """

    def __init__(
        self,
        labeled,
        unlabeled,
        category_to_label: dict[int, int],
        ratio: int,
        views: ViewConfig,
        unlabeled_from_epoch: int = 0,
    ):
        self.labeled, self.unlabeled, self.ratio, self.views = labeled, unlabeled, ratio, views
        self.category_to_label = category_to_label
        self.unlabeled_from_epoch, self.epoch = unlabeled_from_epoch, unlabeled_from_epoch
        if ratio > 0 and (unlabeled is None or len(unlabeled) == 0):
            raise ValueError(f"ratio {ratio} needs unlabeled images")

    def __len__(self) -> int:
        return len(self.labeled)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        v = self.views.labeled(_as_view(*self.labeled[i], self.category_to_label))
        item = {"labeled": v.image, "target": {"boxes": v.boxes.float(), "labels": v.labels}}
        if self.ratio > 0 and self.epoch >= self.unlabeled_from_epoch:
            pairs = []
            for j in torch.randint(len(self.unlabeled), (self.ratio,)).tolist():
                image, target = self.unlabeled[j]
                base = _as_view(
                    image,
                    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                    self.category_to_label,
                )
                weak, strong = self.views.weak(base), self.views.strong(base)
                pairs.append((weak.image, strong.image, weak.matrix, strong.matrix))
            item["unlabeled"] = pairs
        return item


def collate_views(items: list[dict]) -> dict:
    """Batch :class:`SemiSupervisedViews` items: lists of images, targets and matrices."""
    batch = {"labeled": [it["labeled"] for it in items], "targets": [it["target"] for it in items]}
    pairs = [p for it in items for p in it.get("unlabeled", [])]
    if pairs:
        batch["weak"], batch["strong"], batch["weak_matrix"], batch["strong_matrix"] = (list(x) for x in zip(*pairs))
    return batch
