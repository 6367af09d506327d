"""iBOT pretraining throughput: images/s, peak memory and (on GPU) model FLOPs utilisation, plus the
multi-crop data pipeline's images per CPU-second.

Times full training steps of this project's iBOT (``components.models.ibot.IBOTTraining``): the
teacher on the two global crops, the student on the masked global crops and the local crops, the
iBOT loss with its centre update, backward, per-parameter clipping, AdamW, and the EMA teacher update
-- on synthetic crops and block masks already on the device. FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; forward + backward);
MFU = FLOPs per step x steps/s / the device's dense peak for the precision (``--peak-tflops``
overrides the built-in table). Peak memory is the CUDA allocator's peak, or on CPU the rise of the
process's peak RSS above its post-import baseline.

    # the paper's ViT-B/16 setting (2 x 224 + 10 x 96 crops, 8192 prototypes), on a GPU:
    python benchmarks/ibot_throughput.py --preset vit_base_patch16_224 --batch 128 --num-local 10 --local-size 96 \\
        --out-dim 8192 --hidden-dim 2048 --bottleneck-dim 256 --precision bf16 --compile
    # the stage's CPU default (params.yaml):
    python benchmarks/ibot_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.data.masking import BlockMaskGenerator  # noqa: E402
from components.data.multicrop import MultiCropAugmentation  # noqa: E402
from components.models.ibot import IBOTLoss, create_ibot_pair  # noqa: E402
from components.models.vit import PRESETS, ViTSpec  # noqa: E402
from components.training.engine import clip_per_param  # noqa: E402
from components.training.ibot import IBOTTraining  # noqa: E402
from components.training.optim import adamw, param_groups  # noqa: E402

# Dense tensor-core peaks (TFLOP/s) from the vendors' datasheets, by device-name fragment.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},  # fp32 = TF32 tensor cores
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(spec: ViTSpec, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    grid = spec.img_size // spec.patch_size
    masks = BlockMaskGenerator()
    return {
        "global": [torch.randn(args.batch, 3, spec.img_size, spec.img_size, generator=g).to(device) for _ in range(2)],
        "local": [
            torch.randn(args.batch, 3, args.local_size, args.local_size, generator=g).to(device)
            for _ in range(args.num_local)
        ],
        "masks": [
            torch.stack([masks(grid, grid, generator=g) for _ in range(args.batch)]).to(device) for _ in range(2)
        ],
    }


def measure_training(args, device: torch.device) -> dict:
    spec = ViTSpec.from_preset(args.preset)
    baseline_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)

    student, teacher = create_ibot_pair(spec, args.out_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim)
    student, teacher = student.to(device), teacher.to(device)
    loss = IBOTLoss(args.out_dim, args.out_dim, 2, args.num_local).to(device)
    total = args.warmup + args.steps + 1
    ibot = IBOTTraining(student, teacher, loss, steps_per_epoch=total, total_steps=total, freeze_last_layer_epochs=0)
    optimizer = adamw(param_groups(student, 0.04), lr=5e-4, device=device)
    forward = torch.compile(student) if args.compile else student
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    batch = synthetic_batch(spec, args, device)
    params = [p for p in student.parameters() if p.requires_grad]

    def step(i: int) -> torch.Tensor:
        with autocast:
            value, _ = ibot.step_fn(forward, batch, i)
        value.backward()
        clip_per_param(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ibot.after_step(i)
        return value

    with FlopCounterMode(display=False) as counter:  # one uncompiled step: forward + backward FLOPs
        with autocast:
            value, _ = ibot.step_fn(student, batch, 0)
        value.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    for i in range(args.warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        last = step(i)
    float(last.detach())
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = args.batch * args.steps
    if device.type == "cuda":
        peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_rss_mb
    peak = args.peak_tflops or device_peak_tflops(device, args.precision)
    achieved = flops_per_step * args.steps / wall / 1e12
    return {
        "images_per_s": round(images / wall, 2),
        "images_per_cpu_s": round(images / cpu, 2) if device.type == "cpu" else None,
        "step_ms": round(1000 * wall / args.steps, 1),
        "peak_memory_mib": round(peak_mem_mb, 1),
        "gflops_per_image": round(flops_per_step / args.batch / 1e9, 3),
        "achieved_tflops": round(achieved, 3),
        "mfu": round(achieved / peak, 4) if peak else None,
    }


def measure_augmentation(args, spec: ViTSpec) -> dict:
    """Multi-crop + masks for ``--augment-images`` synthetic PIL images, one process, no workers."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (spec.img_size, spec.img_size, 3), dtype=np.uint8))
        for _ in range(args.augment_images)
    ]
    augment = MultiCropAugmentation(spec.img_size, args.local_size, args.num_local, blur_sigma=tuple(args.blur_sigma))
    masks, grid = BlockMaskGenerator(), spec.img_size // spec.patch_size
    wall, cpu = time.perf_counter(), time.process_time()
    for im in images:
        augment(im)
        masks(grid, grid)
        masks(grid, grid)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "augment_images_per_s": round(len(images) / wall, 1),
        "augment_images_per_cpu_s": round(len(images) / cpu, 1),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vit_micro_patch4_32", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=64, help="images per step (each gives 2 global + num-local crops)")
    p.add_argument("--num-local", type=int, default=2)
    p.add_argument("--local-size", type=int, default=16)
    p.add_argument("--out-dim", type=int, default=256, help="prototypes (shared head: [CLS] and patches)")
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--bottleneck-dim", type=int, default=64)
    p.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 0.3))
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--augment-images", type=int, default=200, help="images for the data-pipeline figure (0: skip)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    spec = ViTSpec.from_preset(args.preset)
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        **{
            k: getattr(args, k)
            for k in (
                "preset",
                "batch",
                "num_local",
                "local_size",
                "out_dim",
                "hidden_dim",
                "bottleneck_dim",
                "precision",
                "compile",
                "steps",
            )
        },
        **measure_training(args, device),
    }
    if args.augment_images:
        result.update(measure_augmentation(args, spec))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
