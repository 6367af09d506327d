"""Soft Teacher: end-to-end semi-supervised object detection (Xu et al., ICCV 2021).

Each step mixes labeled and unlabeled images (1:4 in the paper). The teacher, an EMA of the student
(Sec. 3.1; the official ``MeanTeacher`` hook: parameters only, momentum ``min(m, 1 - 1/(t+1))`` after t
student steps, so while below ``m`` the teacher is the average of the student's states S_0..S_t), detects objects
in a weak view of each unlabeled image; its detections become pseudo boxes for the student, which
sees a strong view of the same image. Boxes move between the views through their transform matrices.

* pseudo boxes with score > 0.9 are the targets of the student's RPN and of its classification;
* soft teacher (Sec. 3.2): the student's proposals assigned to background are weighted by the
  teacher's background probability for the same box (scored by the teacher's box head in the weak
  view), and the classification loss is normalised by the sum of the weights (official code; the
  paper's separate fg/bg normalisation is a typo, SoftTeacher issue #19);
* box jitter (Sec. 3.3): each candidate pseudo box (score > 0.5) is jittered 10 times (std 0.06 of its
  size), refined by the teacher's box head, and kept as a regression target only when the std of the
  refined boxes, relative to their size, is below 0.02.

L = L_sup + alpha * L_unsup (Eq. 1). Every function works on torchvision's Faster R-CNN parts
(``transform``, ``backbone``, ``rpn``, ``roi_heads``); ``fastrcnn_loss`` takes no weights, so the
soft-weighted classification loss is written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import boxes as box_ops

from components.data.box_transforms import between_views, clip_boxes, larger_than, transform_boxes
from components.models.detection import DetectorSpec, create_detector
from components.training.ema import ema_update

Targets = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SoftTeacherConfig:
    """The method's knobs (official ``configs/soft_teacher/base.py`` defaults)."""

    unsup_weight: float = 4.0  # alpha
    rpn_threshold: float = 0.9  # pseudo boxes for the RPN
    cls_threshold: float = 0.9  # pseudo boxes for the classification branch
    initial_threshold: float = 0.5  # teacher detections kept as candidates (box jitter)
    reg_uncertainty: float = 0.02  # box-jitter threshold for regression targets
    jitter_times: int = 10
    jitter_scale: float = 0.06
    ema_momentum: float = 0.999
    ema_buffers: bool = False  # also copy the student's buffers each update (the reference: parameters only)
    min_box_size: float = 0.0  # pseudo boxes kept when w and h > this (px) in the student view (min_pseduo_box_size)
    burn_in_steps: int = 0  # supervised-only steps before the unsupervised loss starts (0: end-to-end, as the paper)


# --------------------------------------------------------------------------- the mean teacher
def teacher_momentum(step: int, momentum: float, warm_up: int = 0) -> float:
    """The ``MeanTeacher`` hook's ``min(m, 1 - (1 + warm_up) / (t + 1 + warm_up))`` for a student that has
    taken ``t = step`` optimizer steps: 0 at t = 0 (the teacher is a copy), then ``t / (t + 1)`` (warm_up 0,
    the official configs) until it reaches ``m``."""
    return min(momentum, 1.0 - (1.0 + warm_up) / (step + 1.0 + warm_up))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, step: int, momentum: float, buffers: bool = False) -> float:
    """One ``MeanTeacher.momentum_update`` with the student after ``step`` optimizer steps: EMA of the
    parameters only, as the reference. ``buffers=True`` also copies the student's buffers (BatchNorm
    running statistics, for the ``bn`` norm whose statistics the student updates; the reference keeps its
    BatchNorm frozen, so its buffers never change)."""
    m = teacher_momentum(step, momentum)
    ema_update(teacher, student, m)
    if buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            tb.copy_(sb)
    return m


# --------------------------------------------------------------------------- detector parts
def batch_images(detector: FasterRCNN, images: list[torch.Tensor]) -> ImageList:
    """Normalise and pad images as the detector's transform does, without resizing them."""
    t = detector.transform
    normed = [t.normalize(img) for img in images]
    return ImageList(t.batch_images(normed, size_divisible=t.size_divisible), [tuple(img.shape[-2:]) for img in images])


def box_head_outputs(
    detector: FasterRCNN, features: dict, boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits [N, C+1] and box deltas [N, (C+1)*4] of the box head for ``boxes`` (all images)."""
    rh = detector.roi_heads
    x = rh.box_head(rh.box_roi_pool(features, boxes, image_sizes))  # [N, R]
    return rh.box_predictor(x)


def refine_boxes(
    detector: FasterRCNN, features: dict, boxes: list[torch.Tensor], labels: list[torch.Tensor], image_sizes
) -> list[torch.Tensor]:
    """The box head's refinement of each box for its class (decoded and clipped to the image)."""
    if sum(len(b) for b in boxes) == 0:
        return [b.reshape(0, 4) for b in boxes]
    _, deltas = box_head_outputs(detector, features, boxes, image_sizes)
    decoded = detector.roi_heads.box_coder.decode(deltas, boxes)  # [N, C+1, 4]
    out, start = [], 0
    for b, lab, size in zip(boxes, labels, image_sizes):
        d = decoded[start : start + len(b)]
        start += len(b)
        out.append(box_ops.clip_boxes_to_image(d[torch.arange(len(b), device=d.device), lab], size))  # [n, 4]
    return out


def background_probability(
    detector: FasterRCNN, features: dict, boxes: list[torch.Tensor], image_sizes
) -> torch.Tensor:
    """The box head's background probability (softmax column 0) for each box, all images: [N]."""
    logits, _ = box_head_outputs(detector, features, boxes, image_sizes)
    return F.softmax(logits.float(), dim=-1)[:, 0]


# --------------------------------------------------------------------------- pseudo boxes
def select_pseudo_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher detections with score strictly above ``threshold`` (official ``filter_invalid``)."""
    keep = scores > threshold
    return boxes[keep], labels[keep]


def select_reliable_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, uncertainty: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo boxes whose box-jitter uncertainty is strictly below ``threshold`` (regression targets)."""
    keep = uncertainty < threshold
    return boxes[keep], labels[keep]


def jitter_boxes(boxes: torch.Tensor, times: int, scale: float) -> torch.Tensor:
    """[N, 4] -> [times, N, 4]: Gaussian offsets with std ``scale`` x width (x1, x2) / height (y1, y2)."""
    wh = (boxes[:, 2:4] - boxes[:, :2]).clamp(min=1.0)  # [N, 2]
    sigma = wh.repeat(1, 2) * scale  # [N, 4] = (w, h, w, h) * scale
    return (
        boxes.unsqueeze(0) + torch.randn(times, *boxes.shape, device=boxes.device, dtype=boxes.dtype) * sigma
    )  # [J, N, 4]


def box_uncertainty(refined: torch.Tensor) -> torch.Tensor:
    """[J, N, 4] refined jittered boxes -> [N]: std over the jitters of each coordinate, divided by the
    mean refined width (x1, x2) or height (y1, y2), averaged over the four coordinates."""
    if refined.shape[1] == 0:
        return refined.new_zeros(0)
    std = refined.std(dim=0)  # [N, 4]
    mean = refined.mean(dim=0)  # [N, 4]
    wh = (mean[:, 2:4] - mean[:, :2]).clamp(min=1.0)  # [N, 2]
    return (std / wh.repeat(1, 2)).mean(dim=-1)  # [N]


def jitter_uncertainty(
    refine: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
    boxes: list[torch.Tensor],
    labels: list[torch.Tensor],
    times: int,
    scale: float,
) -> list[torch.Tensor]:
    """Box-jitter regression uncertainty of each pseudo box (Sec. 3.3); ``refine(boxes, labels)`` is the
    teacher's box head (:func:`refine_boxes` bound to its features)."""
    jittered = [jitter_boxes(b, times, scale).reshape(-1, 4) for b in boxes]  # per image [J*N, 4]
    refined = refine(jittered, [lab.repeat(times) for lab in labels])
    return [box_uncertainty(r.reshape(times, len(b), 4)) for r, b in zip(refined, boxes)]  # per image [N]


# --------------------------------------------------------------------------- soft-teacher losses
def background_weights(labels: torch.Tensor, teacher_background: torch.Tensor) -> torch.Tensor:
    """Per-proposal weights: 1 for proposals assigned to a pseudo box, the teacher's background
    probability for proposals assigned to background (label 0)."""
    return torch.where(
        labels == 0, teacher_background.to(torch.float32), torch.ones_like(teacher_background, dtype=torch.float32)
    )


def soft_classification_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * CE) / max(sum(w), 1)`` over the sampled proposals (official ``unsup_rcnn_cls_loss``)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # [N]
    return (weights * ce).sum() / weights.sum().clamp(min=1.0)


@dataclass
class TeacherOutput:
    """What the teacher gives the student for one batch of weak views (teacher-view coordinates)."""

    features: dict  # backbone features of the weak views
    image_sizes: list[tuple[int, int]]
    boxes: list[torch.Tensor]  # candidate pseudo boxes (score > initial threshold) [n, 4]
    labels: list[torch.Tensor]  # [n]
    scores: list[torch.Tensor]  # [n]
    uncertainty: list[torch.Tensor]  # box-jitter uncertainty [n]


@torch.no_grad()
def teacher_pseudo_boxes(teacher: FasterRCNN, weak_images: list[torch.Tensor], cfg: SoftTeacherConfig) -> TeacherOutput:
    """The teacher's detections (test-time NMS) on the weak views, their box-jitter uncertainty, and
    the features needed later to score the student's proposals."""
    images = batch_images(teacher, weak_images)
    features = teacher.backbone(images.tensors)
    proposals, _ = teacher.rpn(images, features)
    # boxes scoring below the initial threshold are dropped anyway; dropping them before NMS saves time
    # and changes nothing above it (a lower-scoring box never suppresses a higher-scoring one)
    score_thresh, teacher.roi_heads.score_thresh = (
        teacher.roi_heads.score_thresh,
        max(teacher.roi_heads.score_thresh, cfg.initial_threshold),
    )
    try:
        detections, _ = teacher.roi_heads(features, proposals, images.image_sizes)
    finally:
        teacher.roi_heads.score_thresh = score_thresh
    boxes, labels, scores = [], [], []
    for det in detections:
        keep = det["scores"] > cfg.initial_threshold
        boxes.append(det["boxes"][keep].float())
        labels.append(det["labels"][keep])
        scores.append(det["scores"][keep].float())
    refine = lambda b, lab: refine_boxes(teacher, features, b, lab, images.image_sizes)  # noqa: E731
    uncertainty = jitter_uncertainty(refine, boxes, labels, cfg.jitter_times, cfg.jitter_scale)
    return TeacherOutput(features, images.image_sizes, boxes, labels, scores, uncertainty)


def to_student_view(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    student_from_teacher: torch.Tensor,
    size: tuple[int, int],
    min_size: float,
) -> dict[str, torch.Tensor]:
    """Pseudo boxes mapped into the student's view, clipped to it, those not wider and higher than
    ``min_size`` dropped (the reference's ``filter_invalid``; 0 keeps any box of positive size)."""
    mapped, _ = clip_boxes(transform_boxes(boxes, student_from_teacher), size)
    keep = larger_than(mapped, min_size)
    return {"boxes": mapped[keep], "labels": labels[keep]}


def pseudo_targets(
    t: TeacherOutput, student_from_teacher: list[torch.Tensor], sizes: list[tuple[int, int]], cfg: SoftTeacherConfig
) -> tuple[Targets, Targets, Targets]:
    """Targets of the student's RPN (score > rpn_threshold), classification (score > cls_threshold)
    and box regression (box-jitter uncertainty < reg_uncertainty), in the student's views."""

    def targets(select) -> Targets:
        return [
            to_student_view(*select(i), student_from_teacher[i], sizes[i], cfg.min_box_size) for i in range(len(sizes))
        ]

    rpn = targets(lambda i: select_pseudo_boxes(t.boxes[i], t.labels[i], t.scores[i], cfg.rpn_threshold))
    cls = targets(lambda i: select_pseudo_boxes(t.boxes[i], t.labels[i], t.scores[i], cfg.cls_threshold))
    reg = targets(lambda i: select_reliable_boxes(t.boxes[i], t.labels[i], t.uncertainty[i], cfg.reg_uncertainty))
    return rpn, cls, reg


class SoftTeacher(nn.Module):
    """A student detector, its EMA teacher, and the Soft Teacher loss as ``forward``.

    ``forward`` returns a dict of losses with ``loss`` = L_sup + alpha * L_unsup, so a DDP wrapper
    around this module synchronises the student's gradients. The teacher has no gradients and stays in
    eval mode; with no unlabeled batch the step is the supervised baseline (the teacher is still the
    EMA of the student, so both methods are evaluated the same way).
    """

    def __init__(self, student: FasterRCNN, teacher: FasterRCNN, cfg: SoftTeacherConfig):
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.teacher.load_state_dict(student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> SoftTeacher:
        super().train(mode)
        self.teacher.eval()
        return self

    def semi_supervised(self, step: int) -> bool:
        """Whether step ``step`` adds the unlabeled images (after ``burn_in_steps`` supervised steps)."""
        return step >= self.cfg.burn_in_steps

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """EMA update after optimizer step ``step`` (the engine's ``after_step``, counted from 0): the
        student has then taken t = step + 1 steps, the hook's ``curr_step`` before the next iteration, so
        the teacher used at iteration t is the average of S_0..S_t while the momentum is below its cap.
        With a burn-in, the teacher's clock restarts at its last step (t = 0: a copy of the student), so
        the first semi-supervised step starts from a teacher that is a copy of the student (as when
        Unbiased Teacher's burn-in ends)."""
        burn_in = self.cfg.burn_in_steps
        t = step - (burn_in - 1) if burn_in > 0 and step >= burn_in - 1 else step + 1
        return update_teacher(self.teacher, self.student, t, self.cfg.ema_momentum, self.cfg.ema_buffers)

    def forward(
        self,
        labeled: list[torch.Tensor],
        targets: Targets,
        weak: list[torch.Tensor] | None = None,
        strong: list[torch.Tensor] | None = None,
        weak_matrix: list[torch.Tensor] | None = None,
        strong_matrix: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        sup = self.student(labeled, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
        out = {f"sup_{k}": v for k, v in sup.items()}
        loss = sum(sup.values())
        if weak:
            unsup = self.unsupervised_losses(weak, strong, weak_matrix, strong_matrix)
            out.update({k: v for k, v in unsup.items() if k.startswith("unsup_")})
            loss = loss + self.cfg.unsup_weight * sum(v for k, v in unsup.items() if k.startswith("unsup_"))
            out.update({k: v for k, v in unsup.items() if not k.startswith("unsup_")})
        out["loss"] = loss
        return out

    def unsupervised_losses(self, weak, strong, weak_matrix, strong_matrix) -> dict[str, torch.Tensor]:
        cfg, student = self.cfg, self.student
        t = teacher_pseudo_boxes(self.teacher, weak, cfg)
        s_from_t = [between_views(wm, sm) for wm, sm in zip(weak_matrix, strong_matrix)]  # per image [3, 3]
        images = batch_images(student, strong)
        sizes = images.image_sizes
        rpn_targets, cls_targets, reg_targets = pseudo_targets(t, s_from_t, sizes, cfg)

        features = student.backbone(images.tensors)
        proposals, rpn_losses = student.rpn(images, features, rpn_targets)
        rh = student.roi_heads

        # classification: the student's proposals against the score > 0.9 pseudo boxes, background
        # proposals weighted by the teacher's background probability for the same box in its view
        props, _, labels, _ = rh.select_training_samples([p.detach() for p in proposals], cls_targets)
        logits, _ = box_head_outputs(student, features, props, sizes)
        with torch.no_grad():
            t_props = [
                box_ops.clip_boxes_to_image(transform_boxes(p, torch.linalg.inv(m)), size)
                for p, m, size in zip(props, s_from_t, t.image_sizes)
            ]
            bg = background_probability(self.teacher, t.features, t_props, t.image_sizes)  # [N]
        labels = torch.cat(labels)
        weights = background_weights(labels, bg)
        loss_cls = soft_classification_loss(logits, labels, weights)

        # regression: a second sampling against the pseudo boxes with low box-jitter uncertainty
        props_r, _, labels_r, reg_t = rh.select_training_samples([p.detach() for p in proposals], reg_targets)
        logits_r, deltas_r = box_head_outputs(student, features, props_r, sizes)
        _, loss_box = fastrcnn_loss(logits_r, deltas_r, labels_r, reg_t)

        n = max(1, len(strong))
        return {
            "unsup_loss_objectness": rpn_losses["loss_objectness"],
            "unsup_loss_rpn_box_reg": rpn_losses["loss_rpn_box_reg"],
            "unsup_loss_classifier": loss_cls,
            "unsup_loss_box_reg": loss_box,
            "pseudo_boxes_cls": torch.tensor(sum(len(x["boxes"]) for x in cls_targets) / n),
            "pseudo_boxes_reg": torch.tensor(sum(len(x["boxes"]) for x in reg_targets) / n),
            "bg_weight_mean": weights[labels == 0].mean().detach() if bool((labels == 0).any()) else torch.tensor(0.0),
        }


def build_soft_teacher(
    spec: DetectorSpec,
    cfg: SoftTeacherConfig | None = None,
    pretrained: str = "none",
    encoder_dir: str | Path | None = None,
) -> SoftTeacher:
    """The detector of ``spec`` with Soft Teacher in one call: the student (a ResNet backbone's ``pretrained``
    weights, or a ViT backbone's encoder from ``encoder_dir``), the teacher (the same architecture, a copy of
    the student) and the method's loss (``cfg``, the official defaults when None). Called without unlabeled
    images, its ``forward`` is the supervised baseline, still with its EMA teacher (Sec. 3.1)."""
    student = create_detector(spec, pretrained=pretrained, encoder_dir=encoder_dir)
    teacher = create_detector(spec)
    return SoftTeacher(student, teacher, cfg or SoftTeacherConfig())
