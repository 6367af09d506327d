"""Benchmark: minibatch debiased CKA between every layer of two models, our accumulator against the
per-pair loop of popular PyTorch CKA packages, on the same features.

Ours (components/analysis/cka.py, ``MinibatchCKA``): per batch one float64 Gram matrix per layer
from centred features, U-centred in place, and one [L, n*n] @ [n*n, L] product for all pairs.
Per-pair loop (how e.g. torch_cka's ``CKA.compare`` does it): for every layer i of model A the Gram
K; for every layer j of model B the Gram L recomputed, HSIC(K, L) and HSIC(L, L) from Song et al.'s
formula with ``trace(K @ L)`` (an O(n^3) product) and a ``.item()`` host sync per HSIC.

Both read the same synthetic features (two "models" of --layers layers each, ViT-like widths for A
and ResNet-like stage widths for B, derived from one latent so the matrix has structure) and use
the same batches. Prints time, peak memory, the speed ratio and the largest |difference|.

    .venv/bin/python benchmarks/cka_speed.py                      # 12 x 12 layers, 10,000 examples
    .venv/bin/python benchmarks/cka_speed.py --examples 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.analysis.cka import MinibatchCKA  # noqa: E402


def make_features(
    layers: int, examples: int, batch_size: int, seed: int
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Batches of float32 features: ([A layer 0..L-1], [B layer 0..L-1]), each [n, width]."""
    g = torch.Generator().manual_seed(seed)
    widths_a = [192] * layers
    widths_b = [64 * 2 ** min(3, 4 * i // layers) for i in range(layers)]  # 64, 128, 256, 512 stages
    latent = 32
    proj_a = [
        torch.randn(latent if i == 0 else widths_a[i - 1], w, generator=g)
        / math.sqrt(latent if i == 0 else widths_a[i - 1])
        for i, w in enumerate(widths_a)
    ]
    proj_b = [
        torch.randn(latent if i == 0 else widths_b[i - 1], w, generator=g)
        / math.sqrt(latent if i == 0 else widths_b[i - 1])
        for i, w in enumerate(widths_b)
    ]
    batches = []
    for start in range(0, examples, batch_size):
        n = min(batch_size, examples - start)
        z = torch.randn(n, latent, generator=g)  # [n, latent]
        feats = []
        for proj in (proj_a, proj_b):
            h, out = z, []
            for w in proj:
                h = torch.tanh(h @ w) * 2 + 0.3 * torch.randn(n, w.shape[1], generator=g) + 0.5  # [n, width]
                out.append(h)
            feats.append(out)
        batches.append((feats[0], feats[1]))
    return batches


def song_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Unbiased HSIC (Song et al. 2012) on Gram matrices with zeroed diagonals, as popular packages
    compute it: trace(K @ L) plus two corrections, one host sync."""
    n = k.shape[0]
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    result = torch.trace(k @ l)
    result = result + ((ones.T @ k @ ones @ ones.T @ l @ ones) / ((n - 1) * (n - 2))).item()
    result = result - ((ones.T @ k @ l @ ones) * 2 / (n - 2)).item()
    return (result / (n * (n - 3))).item()


def per_pair_loop(batches, device, dtype) -> torch.Tensor:
    """CKA [La, Lb] by the per-pair loop (torch_cka ``CKA.compare`` structure)."""
    la, lb = len(batches[0][0]), len(batches[0][1])
    h = torch.zeros(la, lb, 3, dtype=torch.float64)
    for feats_a, feats_b in batches:
        xs = [f.to(device, dtype) for f in feats_a]
        ys = [f.to(device, dtype) for f in feats_b]
        for i, x in enumerate(xs):
            k = x @ x.T  # [n, n]
            k.fill_diagonal_(0)
            h[i, :, 0] += song_hsic(k, k) / len(batches)
            for j, y in enumerate(ys):
                l = y @ y.T  # [n, n], recomputed for every pair
                l.fill_diagonal_(0)
                h[i, j, 1] += song_hsic(k, l) / len(batches)
                h[i, j, 2] += song_hsic(l, l) / len(batches)
    return h[:, :, 1] / (h[:, :, 0].sqrt() * h[:, :, 2].sqrt())


def accumulator(batches, device) -> torch.Tensor:
    """CKA [La, Lb] from one MinibatchCKA over both models' layers (all pairs at once)."""
    la, lb = len(batches[0][0]), len(batches[0][1])
    names = [f"a/{i}" for i in range(la)] + [f"b/{j}" for j in range(lb)]
    acc = MinibatchCKA(names, kernel="linear", debiased=True, device=device)
    for feats_a, feats_b in batches:
        acc.update([f.to(device, non_blocking=True) for f in feats_a + feats_b])
    return acc.compute()[:la, la:]


def _rss_peak_reset() -> int:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn, device: torch.device):
    """Run fn(); return (result, wall seconds, process CPU seconds, peak extra memory in bytes: GPU
    allocator or process RSS). On a shared CPU the CPU seconds are the steadier figure."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_reset()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else _status("VmHWM") - base
    return out, seconds, cpu, peak


def run_method(method: str, cfg: dict, device: torch.device):
    """Generate the features and measure one method: (CKA [La, Lb], seconds, peak bytes)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    batches = make_features(cfg["layers"], cfg["examples"], cfg["batch_size"], cfg["seed"])
    if device.type == "cuda":
        batches = [([f.to(device) for f in a], [f.to(device) for f in b]) for a, b in batches]
    dtype = getattr(torch, cfg["baseline_dtype"])
    fn = (lambda b: accumulator(b, device)) if method == "accumulator" else (lambda b: per_pair_loop(b, device, dtype))
    fn([([f[:64] for f in a], [f[:64] for f in b]) for a, b in batches[:1]])  # warm-up: thread pools, kernels
    return measure(lambda: fn(batches), device)


def _child(method: str, cfg: dict, conn) -> None:
    out, *figures = run_method(method, cfg, torch.device("cpu"))
    conn.send((out.numpy(), *figures))


def measure_isolated(method: str, cfg: dict, device: torch.device):
    """:func:`run_method` in a fresh (spawned) process on CPU, so neither method reuses the other's
    freed heap and the peak-RSS mark reflects that method alone; in-process on CUDA (allocator stats)."""
    if device.type == "cuda":
        return run_method(method, cfg, device)
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(method, cfg, send))
    proc.start()
    out, *figures = recv.recv()
    proc.join()
    return (torch.from_numpy(out), *figures)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="layers per model (all L x L pairs)")
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument(
        "--baseline-dtype", default="float64", choices=["float64", "float32"], help="the per-pair loop's precision"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cfg = dict(
        layers=args.layers,
        examples=args.examples,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        baseline_dtype=args.baseline_dtype,
    )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    )
    print(
        f"{args.layers} x {args.layers} layers, {args.examples} examples, batch {args.batch_size}, device {name}",
        flush=True,
    )

    fast, t_fast, c_fast, m_fast = measure_isolated("accumulator", cfg, device)
    print(
        f"accumulator (all pairs, one product per batch): {t_fast:8.2f} s wall {c_fast:8.2f} s CPU  peak "
        f"+{m_fast / 2**20:8.1f} MiB",
        flush=True,
    )
    slow, t_slow, c_slow, m_slow = measure_isolated("loop", cfg, device)
    print(
        f"per-pair loop (trace(K @ L), {args.baseline_dtype}):       {t_slow:8.2f} s wall {c_slow:8.2f} s CPU  peak "
        f"+{m_slow / 2**20:8.1f} MiB",
        flush=True,
    )
    diff = (fast - slow).abs().max().item()
    ratio = t_slow / t_fast
    print(
        f"speed-up {ratio:.1f}x wall, {c_slow / c_fast:.1f}x CPU time; largest |CKA difference| {diff:.2e}; CKA range "
        f"[{fast.min().item():.3f}, {fast.max().item():.3f}]"
    )
    result = dict(
        layers=args.layers,
        examples=args.examples,
        batch_size=args.batch_size,
        device=name,
        accumulator_s=t_fast,
        accumulator_cpu_s=c_fast,
        accumulator_peak_mib=m_fast / 2**20,
        loop_s=t_slow,
        loop_cpu_s=c_slow,
        loop_peak_mib=m_slow / 2**20,
        loop_dtype=args.baseline_dtype,
        speedup=ratio,
        speedup_cpu=c_slow / c_fast,
        max_abs_diff=diff,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
