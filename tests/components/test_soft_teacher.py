"""Soft Teacher's properties (Xu et al. 2021): EMA teacher, pseudo-box thresholds, background
weights from the teacher normalised by their sum, box-jitter uncertainty."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.data.box_transforms import hflip_matrix, larger_than
from components.models.detection import DetectorSpec, create_detector
from components.semisup.soft_teacher import (
    SoftTeacher,
    SoftTeacherConfig,
    TeacherOutput,
    background_probability,
    background_weights,
    batch_images,
    box_uncertainty,
    jitter_boxes,
    jitter_uncertainty,
    pseudo_targets,
    select_pseudo_boxes,
    select_reliable_boxes,
    soft_classification_loss,
    teacher_momentum,
    teacher_pseudo_boxes,
    update_teacher,
)


def tiny_detector(num_classes=2):
    torch.manual_seed(0)
    spec = DetectorSpec(
        backbone="resnet18",
        num_classes=num_classes,
        min_size=64,
        max_size=64,
        fpn_channels=32,
        representation_size=32,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
        rpn_post_nms_top_n_train=50,
        rpn_post_nms_top_n_test=50,
    )
    return create_detector(spec)


# --------------------------------------------------------------------------- EMA teacher
def test_teacher_momentum_is_min_of_m_and_one_minus_one_over_t_plus_one():
    assert teacher_momentum(0, 0.999) == 0.0  # first update copies the student
    assert teacher_momentum(9, 0.999) == pytest.approx(0.9)
    assert teacher_momentum(99, 0.999) == pytest.approx(0.99)
    assert teacher_momentum(10_000, 0.999) == 0.999


def test_ema_update_matches_its_formula_on_parameters_only_unless_buffers_are_asked_for():
    torch.manual_seed(0)
    student, teacher = (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
    )
    student[1].running_mean.fill_(0.7)
    before = [p.detach().clone() for p in teacher.parameters()]
    m = update_teacher(teacher, student, step=19, momentum=0.99)
    assert m == pytest.approx(0.95)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.95 * b + 0.05 * s)
    assert torch.equal(teacher[1].running_mean, torch.zeros(4))  # the reference hook leaves buffers alone
    update_teacher(teacher, student, step=0, momentum=0.99, buffers=True)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


def test_mean_teacher_after_one_and_two_updates_is_the_reference_average():
    # MeanTeacher hook (warm_up 0): before_run copies S_0; before iteration t (curr_step = t, the student
    # is S_t) teacher = m_t teacher + (1 - m_t) S_t with m_t = min(m, 1 - 1/(t + 1)): the teacher used at
    # iteration t is mean(S_0..S_t). Our engine calls update_teacher(step) after optimizer step `step`.
    states = [torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, -2.0]]), torch.tensor([[10.0, 3.0]])]  # S_0, S_1, S_2
    student, teacher = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(states[0])
    st = SoftTeacher(student, teacher, SoftTeacherConfig(ema_momentum=0.999))
    assert torch.equal(st.teacher.weight, states[0])  # the teacher used at iteration 0
    reference = states[0].clone()
    averages = [torch.tensor([[2.5, 0.0]]), torch.tensor([[5.0, 1.0]])]  # mean(S_0, S_1), mean(S_0, S_1, S_2)
    for step in (0, 1):
        with torch.no_grad():
            student.weight.copy_(states[step + 1])  # the optimizer step
        curr = step + 1
        m_ref = min(0.999, 1 - (1 + 0) / (curr + 1 + 0))
        reference = m_ref * reference + (1 - m_ref) * states[curr]
        assert st.update_teacher(step) == pytest.approx(m_ref)
        torch.testing.assert_close(st.teacher.weight, reference)
        torch.testing.assert_close(st.teacher.weight, averages[step])


def test_soft_teacher_starts_as_a_frozen_copy_in_eval_mode():
    st = SoftTeacher(tiny_detector(), tiny_detector(), SoftTeacherConfig())
    st.train()
    assert st.student.training and not st.teacher.training
    assert not any(p.requires_grad for p in st.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(st.teacher.state_dict().values(), st.student.state_dict().values()))


def test_build_soft_teacher_is_the_detector_pair_and_the_method_in_one_call():
    """One call gives what detect trains: a student built first (the same draws as building it by hand), a
    teacher of the same architecture that starts as its frozen copy, and the method's config."""
    from components.semisup.soft_teacher import build_soft_teacher

    spec = DetectorSpec(
        backbone="resnet10",
        width=8,
        num_classes=2,
        min_size=64,
        max_size=64,
        fpn_channels=16,
        representation_size=16,
        anchor_sizes=(8, 16, 32, 64, 128),
    )
    cfg = SoftTeacherConfig(unsup_weight=2.0, burn_in_steps=1)
    torch.manual_seed(0)
    st = build_soft_teacher(spec, cfg)
    assert st.cfg is cfg and not st.teacher.training
    assert not any(p.requires_grad for p in st.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(st.teacher.state_dict().values(), st.student.state_dict().values()))
    torch.manual_seed(0)
    by_hand = create_detector(spec)
    assert all(torch.equal(a, b) for a, b in zip(st.student.state_dict().values(), by_hand.state_dict().values()))
    assert build_soft_teacher(spec).cfg == SoftTeacherConfig()  # the official defaults
    with pytest.raises(ValueError, match="encoder_dir is for the ViT backbone"):
        build_soft_teacher(spec, cfg, encoder_dir="models/pretrain_mae")


# --------------------------------------------------------------------------- pseudo boxes
def test_pseudo_label_filtering_respects_each_threshold():
    boxes = torch.tensor([[0.0, 0, 10, 10], [10, 10, 30, 30], [5, 5, 25, 25], [40, 40, 60, 60], [1, 1, 9, 9]])
    labels = torch.tensor([1, 2, 1, 2, 1])
    scores = torch.tensor([0.97, 0.93, 0.90, 0.70, 0.55])
    unc = torch.tensor([0.030, 0.010, 0.019, 0.020, 0.001])
    t = TeacherOutput({}, [(64, 64)], [boxes], [labels], [scores], [unc])
    cfg = SoftTeacherConfig(rpn_threshold=0.95, cls_threshold=0.9, reg_uncertainty=0.02)
    rpn, cls, reg = pseudo_targets(t, [torch.eye(3, dtype=torch.float64)], [(64, 64)], cfg)
    assert torch.equal(rpn[0]["boxes"], boxes[[0]])  # score > 0.95
    assert torch.equal(cls[0]["boxes"], boxes[[0, 1]])  # score > 0.9 (0.90 itself is out)
    assert torch.equal(reg[0]["boxes"], boxes[[1, 2, 4]])  # uncertainty < 0.02, whatever the score
    assert reg[0]["labels"].tolist() == [2, 1, 1]
    # the same filters as plain functions
    assert select_pseudo_boxes(boxes, labels, scores, 0.7)[0].shape[0] == 3
    assert select_reliable_boxes(boxes, labels, unc, 0.0)[0].shape[0] == 0


def test_pseudo_targets_move_into_the_student_view_and_drop_tiny_boxes():
    boxes = torch.tensor([[4.0, 8.0, 20.0, 30.0], [0.0, 0.0, 0.5, 0.5]])
    t = TeacherOutput(
        {}, [(64, 64)], [boxes], [torch.tensor([1, 2])], [torch.tensor([0.99, 0.99])], [torch.tensor([0.0, 0.0])]
    )
    _, cls, _ = pseudo_targets(t, [hflip_matrix(64)], [(64, 64)], SoftTeacherConfig(min_box_size=1.0))
    assert torch.allclose(cls[0]["boxes"], torch.tensor([[44.0, 8.0, 60.0, 30.0]]))  # flipped; the 0.5 px box is gone


def test_a_sub_pixel_pseudo_box_is_kept_as_the_reference_min_pseduo_box_size_0():
    # filter_invalid(min_size=0): keep w > 0 and h > 0; a box clipped to zero width is dropped
    boxes = torch.tensor(
        [[4.0, 8.0, 20.0, 30.0], [10.0, 10.0, 10.5, 10.5], [20.0, 5.0, 23.83, 5.998], [-9.0, 3.0, -1.0, 9.0]]
    )
    n = len(boxes)
    t = TeacherOutput({}, [(64, 64)], [boxes], [torch.arange(n)], [torch.full((n,), 0.99)], [torch.zeros(n)])
    rpn, cls, reg = pseudo_targets(t, [torch.eye(3, dtype=torch.float64)], [(64, 64)], SoftTeacherConfig())
    for targets in (rpn, cls, reg):
        assert torch.allclose(targets[0]["boxes"], boxes[:3]) and targets[0]["labels"].tolist() == [0, 1, 2]
    # the rule is strict: a box exactly min_size wide goes, as in the reference
    assert larger_than(torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 1.5, 2.0]]), 1.0).tolist() == [False, True]


# --------------------------------------------------------------------------- box jitter
def test_jitter_boxes_scale_with_box_size():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 100.0, 10.0]])
    j = jitter_boxes(boxes, 4000, 0.06) - boxes  # [J, 1, 4]
    std = j.std(dim=0)[0]
    assert torch.allclose(std, torch.tensor([6.0, 0.6, 6.0, 0.6]), rtol=0.06)


def test_jitter_uncertainty_is_zero_for_a_consistent_head_and_large_for_a_noisy_one():
    torch.manual_seed(0)
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 8.0, 8.0]])]
    labels = [torch.tensor([1, 2])]

    def consistent(jittered, labs):  # maps every jittered box back to its pseudo box
        return [boxes[0].repeat(10, 1) for _ in jittered]

    def noisy(jittered, labs):  # keeps the jitter and adds its own noise
        return [b + torch.randn_like(b) * 3.0 for b in jittered]

    zero = jitter_uncertainty(consistent, boxes, labels, times=10, scale=0.06)[0]
    large = jitter_uncertainty(noisy, boxes, labels, times=10, scale=0.06)[0]
    assert torch.allclose(zero, torch.zeros(2), atol=1e-6)
    assert (large > 0.02).all() and (large > 0.05).all()


def test_box_uncertainty_is_std_over_jitters_relative_to_size():
    refined = torch.tensor([[[0.0, 0.0, 10.0, 20.0]], [[2.0, 0.0, 12.0, 20.0]]])  # x shifts by 2: std sqrt(2)
    expected = (math.sqrt(2) / 10 * 2) / 4  # x1, x2 over width 10; y1, y2 unchanged
    assert box_uncertainty(refined).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- background weights
def test_background_weights_are_the_teachers_background_probabilities():
    teacher = tiny_detector().eval()
    images = batch_images(teacher, [torch.rand(3, 64, 64)])
    with torch.no_grad():
        features = teacher.backbone(images.tensors)
        boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 50.0, 40.0], [30.0, 5.0, 60.0, 60.0]])]
        bg = background_probability(teacher, features, boxes, images.image_sizes)
        rh = teacher.roi_heads
        logits, _ = rh.box_predictor(rh.box_head(rh.box_roi_pool(features, boxes, images.image_sizes)))
    assert torch.allclose(bg, F.softmax(logits, -1)[:, 0])
    labels = torch.tensor([0, 2, 0])
    w = background_weights(labels, bg)
    assert torch.allclose(w, torch.stack([bg[0], torch.tensor(1.0), bg[2]]))


def test_soft_classification_loss_is_normalised_by_the_sum_of_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 0, 2, 0])
    weights = torch.tensor([0.9, 0.2, 1.0, 0.6, 1.0, 0.8])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert soft_classification_loss(logits, labels, weights).item() == pytest.approx(
        ((weights * ce).sum() / weights.sum()).item()
    )
    # normalised: scaling the weights (sum >= 1) leaves the loss unchanged; a sum below 1 divides by 1
    assert soft_classification_loss(logits, labels, 3 * weights).item() == pytest.approx(
        soft_classification_loss(logits, labels, weights).item(), rel=1e-6
    )
    small = torch.full((6,), 0.1)
    assert soft_classification_loss(logits, labels, small).item() == pytest.approx((0.1 * ce).sum().item(), rel=1e-6)
    # background proposals the teacher finds foreground-like (low background probability) count less
    low = weights.clone()
    low[labels == 0] = 0.0
    assert soft_classification_loss(logits, labels, low).item() == pytest.approx(
        (ce[labels > 0]).sum().item() / 2, rel=1e-6
    )


# --------------------------------------------------------------------------- the step
def test_soft_teacher_step_trains_only_the_student():
    torch.manual_seed(0)
    st = SoftTeacher(
        tiny_detector(),
        tiny_detector(),
        SoftTeacherConfig(initial_threshold=0.0, rpn_threshold=0.0, cls_threshold=0.0, reg_uncertainty=1.0),
    )
    st.train()
    img = torch.rand(3, 64, 64)
    eye = torch.eye(3, dtype=torch.float64)
    out = st(
        [img],
        [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}],
        weak=[img, img],
        strong=[img.flip(-1), img],
        weak_matrix=[eye, eye],
        strong_matrix=[hflip_matrix(64), eye],
    )
    for k in (
        "unsup_loss_objectness",
        "unsup_loss_rpn_box_reg",
        "unsup_loss_classifier",
        "unsup_loss_box_reg",
        "sup_loss_classifier",
    ):
        assert torch.isfinite(out[k]), k
    sup = sum(v for k, v in out.items() if k.startswith("sup_"))
    unsup = sum(v for k, v in out.items() if k.startswith("unsup_"))
    assert torch.allclose(out["loss"], sup + 4.0 * unsup)
    out["loss"].backward()
    assert all(p.grad is None for p in st.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in st.student.parameters())
    # without unlabeled images the step is the supervised baseline
    base = st([img], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    assert set(base) == {
        "sup_loss_classifier",
        "sup_loss_box_reg",
        "sup_loss_objectness",
        "sup_loss_rpn_box_reg",
        "loss",
    }


def test_teacher_pseudo_boxes_are_its_detections_above_the_initial_threshold():
    teacher = tiny_detector().eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    cfg = SoftTeacherConfig(initial_threshold=0.3, jitter_times=3)
    out = teacher_pseudo_boxes(teacher, images, cfg)
    with torch.no_grad():
        full = teacher(images)  # test-time path (score threshold 0.05), 64 px images are not resized
    assert teacher.roi_heads.score_thresh == 0.05  # restored
    for det, boxes, scores, unc in zip(full, out.boxes, out.scores, out.uncertainty):
        keep = det["scores"] > 0.3
        assert torch.allclose(boxes, det["boxes"][keep]) and torch.allclose(scores, det["scores"][keep])
        assert unc.shape == scores.shape and (unc >= 0).all()
    assert sum(len(b) for b in out.boxes) > 0  # the random teacher's scores straddle the threshold


def test_burn_in_restarts_the_teacher_as_a_copy_when_unlabeled_images_come_in():
    st = SoftTeacher(nn.Linear(3, 2), nn.Linear(3, 2), SoftTeacherConfig(burn_in_steps=5, ema_momentum=0.99))
    assert [st.semi_supervised(s) for s in (0, 4, 5, 6)] == [False, False, True, True]
    assert st.update_teacher(3) == pytest.approx(0.8)  # during burn-in: t = 4 student steps, min(m, 1 - 1/(t+1))
    with torch.no_grad():
        st.student.weight.add_(1.0)
    assert st.update_teacher(4) == 0.0  # last burn-in step: the teacher becomes the student
    assert torch.equal(st.teacher.weight, st.student.weight)
    assert st.update_teacher(5) == pytest.approx(0.5) and st.update_teacher(500) == 0.99
    assert SoftTeacher(nn.Linear(3, 2), nn.Linear(3, 2), SoftTeacherConfig()).semi_supervised(
        0
    )  # end-to-end by default
