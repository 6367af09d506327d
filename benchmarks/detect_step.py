"""Benchmark: time per training iteration of Soft Teacher against the supervised baseline.

Both steps use the detector, batch and views of ``detect`` in a params file (default: params.yaml) and
run through the same ``SoftTeacher`` module the stage trains: the supervised step is the student's
loss on ``batch_size`` labeled images; the Soft Teacher step adds ``batch_size x unlabeled_ratio``
unlabeled images (teacher pass on weak views, box jitter, student pass on strong views, the teacher
scoring the student's proposals). Each iteration includes backward, the optimizer step and the EMA
update. Weights are random; so that the teacher's pseudo-box work is realistic, its thresholds are
set to 0 and its detections capped at ``--pseudo-boxes`` per image (the scenes hold 2-5 objects).
Images are random tensors at the size the views give them.

    .venv/bin/python benchmarks/detect_step.py --threads 1            # CPU figures in benchmarks/README.md
    .venv/bin/python benchmarks/detect_step.py --device cuda --steps 50 --params params/gpu-vit-b16.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.models.detection import DetectorSpec, create_detector  # noqa: E402
from components.semisup.soft_teacher import SoftTeacher, SoftTeacherConfig  # noqa: E402
from pipelines.config import load_params  # noqa: E402


def build(
    params, num_classes: int, pseudo_boxes: int, device: torch.device
) -> tuple[SoftTeacher, torch.optim.Optimizer]:
    m = params.detect.model
    vit = params.pretrain_mae.model.spec().to_dict() if m.backbone == "vit" else None
    spec = DetectorSpec(num_classes=num_classes, vit=vit, **m.model_dump(exclude={"init"}))
    st = params.detect.soft_teacher
    cfg = SoftTeacherConfig(
        unsup_weight=st.unsup_weight,
        rpn_threshold=0.0,
        cls_threshold=0.0,
        initial_threshold=0.0,
        reg_uncertainty=st.reg_uncertainty,
        jitter_times=st.jitter_times,
        jitter_scale=st.jitter_scale,
        ema_momentum=st.ema_momentum,
    )
    model = SoftTeacher(create_detector(spec), create_detector(spec), cfg).to(device).train()
    model.teacher.roi_heads.detections_per_img = pseudo_boxes
    params_ = [p for p in model.student.parameters() if p.requires_grad]
    d = params.detect
    opt = (
        torch.optim.SGD(params_, lr=1e-4, momentum=d.momentum)
        if d.optimizer == "sgd"
        else torch.optim.AdamW(params_, lr=1e-4)
    )
    return model, opt


def batch(params, classes: int, device: torch.device, unlabeled: bool, g: torch.Generator) -> dict:
    d = params.detect
    size = round(params.prepare.detection.image_size * sum(d.views.resize_range) / 2)
    n = d.batch_size

    def image() -> torch.Tensor:
        return torch.rand(3, size, size, generator=g).to(device)

    def target() -> dict:
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + size * 0.08
        return {
            "boxes": torch.cat([xy, xy + wh], 1).to(device),
            "labels": torch.randint(1, classes + 1, (3,), generator=g).to(device),
        }

    out = {"labeled": [image() for _ in range(n)], "targets": [target() for _ in range(n)]}
    if unlabeled:
        k = n * d.soft_teacher.unlabeled_ratio
        eye = torch.eye(3, dtype=torch.float64, device=device)
        out.update(
            weak=[image() for _ in range(k)],
            strong=[image() for _ in range(k)],
            weak_matrix=[eye] * k,
            strong_matrix=[eye] * k,
        )
    return out


def time_steps(
    model: SoftTeacher, opt, batches: list[dict], warmup: int, device: torch.device, precision: str
) -> list[float]:
    times = []
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast(device.type, enabled=False)
    )
    for i, b in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = model(
                b["labeled"], b["targets"], b.get("weak"), b.get("strong"), b.get("weak_matrix"), b.get("strong_matrix")
            )["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_teacher(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20, help="timed iterations per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--pseudo-boxes", type=int, default=5, help="teacher detections kept per unlabeled image")
    ap.add_argument(
        "--classes",
        type=int,
        default=None,
        help="foreground classes (default: 1 with detect.class_agnostic, else 8 as the shapes)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    params = load_params(args.params)
    classes = args.classes or (1 if params.detect.class_agnostic else 8)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision,
        "backbone": params.detect.model.backbone,
        "batch_size": params.detect.batch_size,
        "unlabeled_ratio": params.detect.soft_teacher.unlabeled_ratio,
        "classes": classes,
        "image_size": round(params.prepare.detection.image_size * sum(params.detect.views.resize_range) / 2),
    }
    for method in ("supervised", "softteacher"):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model, opt = build(params, classes, args.pseudo_boxes, device)
        batches = [batch(params, classes, device, method == "softteacher", g) for _ in range(args.warmup + args.steps)]
        cpu0 = time.process_time()
        times = time_steps(model, opt, batches, args.warmup, device, precision)
        results[method] = {
            "median_s": statistics.median(times),
            "mean_s": statistics.fmean(times),
            "cpu_s_per_step": (time.process_time() - cpu0) / (args.warmup + args.steps),
            "images_per_step": len(batches[0]["labeled"]) + len(batches[0].get("weak", [])),
        }
        del model, opt
    results["ratio_median"] = results["softteacher"]["median_s"] / results["supervised"]["median_s"]
    results["ratio_cpu"] = results["softteacher"]["cpu_s_per_step"] / results["supervised"]["cpu_s_per_step"]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
