"""The device check: the GPU path in one run, with progress, in a fixed time budget.

    make gpu-check                 # on a GPU machine: python benchmarks/gpu_check.py --device cuda
    make gpu-check DEVICE=cpu      # the same code paths at tiny sizes (the suite runs this too)

Sections, each in its own subprocess with its own time limit; the results file is rewritten after
every section, so a run cut short still reports what it measured:

- ``env``: torch, CUDA and Python versions, the device's name and memory, the bf16 peak used for MFU;
- ``mae``: ``benchmarks/mae_throughput.py``, this project's MAE (bf16, torch.compile) against
  transformers' ``ViTMAEForPreTraining`` (SDPA) at the same size: images/s, MFU, peak memory, ratio;
- ``ibot``: ``benchmarks/ibot_throughput.py``, 2 global + 10 local crops, the profile's head: images/s, memory;
- ``detect``: ``benchmarks/detect_step.py``, Soft Teacher against the supervised step with the
  profile's detector (ratio of step times);
- ``cka``: ``benchmarks/cka_speed.py``, 12 x 12 layers x 10,000 examples, accumulator against the
  per-pair loop (ratio);
- ``dag``: the GPU profile with the size-only overrides of ``params/gpu-vit-b16.smoke.yaml`` through
  every stage of dvc.yaml in its order (each stage's own command, the profile's launcher), in a
  scratch copy of the project: each stage's exit code, wall time and images/s.

Writes ``benchmarks/results/gpu-check-<device>.json`` and ``.md`` (``--out`` moves them).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "params" / "gpu-vit-b16.yaml"
SMOKE = ROOT / "params" / "gpu-vit-b16.smoke.yaml"
BENCH = ROOT / "benchmarks"
PROJECT_FILES = ("components", "pipelines", "datasets", "dvc.yaml", ".dvcignore", "pyproject.toml")

# Each benchmark's arguments by device kind: the papers' sizes on a GPU, tiny ones on a CPU.
BENCH_ARGS = {
    "cuda": {
        "mae": [
            "--preset",
            "vit_base_patch16_224",
            "--batch",
            "256",
            "--precision",
            "bf16",
            "--compile",
            "--steps",
            "20",
            "--warmup",
            "5",
        ],
        "ibot": [
            "--preset",
            "vit_base_patch16_224",
            "--batch",
            "64",
            "--num-local",
            "10",
            "--local-size",
            "96",
            "--out-dim",
            "8192",
            "--hidden-dim",
            "2048",
            "--bottleneck-dim",
            "256",
            "--blur-sigma",
            "0.1",
            "2.0",
            "--precision",
            "bf16",
            "--steps",
            "10",
            "--warmup",
            "3",
            "--augment-images",
            "0",
        ],
        "detect": ["--params", str(PROFILE), "--precision", "bf16", "--steps", "20", "--warmup", "3"],
        "cka": ["--layers", "12", "--examples", "10000", "--batch-size", "1000"],
    },
    "cpu": {
        "mae": [
            "--preset",
            "vit_micro_patch4_32",
            "--batch",
            "16",
            "--decoder-dim",
            "32",
            "--decoder-depth",
            "1",
            "--decoder-heads",
            "2",
            "--precision",
            "bf16",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        "ibot": [
            "--preset",
            "vit_micro_patch4_32",
            "--batch",
            "4",
            "--num-local",
            "10",
            "--local-size",
            "16",
            "--out-dim",
            "64",
            "--hidden-dim",
            "32",
            "--bottleneck-dim",
            "16",
            "--precision",
            "bf16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--augment-images",
            "0",
        ],
        "detect": ["--params", "{smoke_params}", "--precision", "bf16", "--steps", "2", "--warmup", "1"],
        "cka": ["--layers", "4", "--examples", "400", "--batch-size", "100"],
    },
}
# Seconds each section may take before it is stopped (the whole check must fit 8 minutes on one GPU).
LIMITS = {
    "cuda": {"mae": 100, "dag": 330, "ibot": 60, "detect": 45, "cka": 30},
    "cpu": {"mae": 60, "dag": 240, "ibot": 45, "detect": 45, "cka": 30},
}
SECTIONS = ("env", "mae", "dag", "ibot", "detect", "cka")
STAGE_SHARE = 0.3  # no one stage of the DAG may take more than this share of the section's time


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key (the stages' params schema checks the keys)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def smoke_params(kind: str) -> dict:
    """The GPU profile with the size-only overrides for ``kind`` (cuda or cpu)."""
    return deep_merge(yaml.safe_load(PROFILE.read_text()), yaml.safe_load(SMOKE.read_text())[kind])


# --------------------------------------------------------------------------- dvc.yaml's commands
_REF = re.compile(r"\$\{([^}]+)\}")


def _lookup(context: dict, dotted: str):
    value = context
    for part in dotted.split("."):
        value = value[part]
    return value


def _interpolate(text: str, context: dict) -> str:
    return _REF.sub(lambda m: str(_lookup(context, m.group(1).strip())), text)


def stage_commands(dvc_yaml: Path, params: dict) -> list[tuple[str, str]]:
    """``(stage, command)`` for every stage of dvc.yaml, matrix and foreach items expanded, in the
    file's order (which is a topological order of the DAG: a stage comes after what it reads)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = []
    for name, stage in stages.items():
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):
                items = _lookup(params, _REF.fullmatch(items.strip()).group(1))
            pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
            for key, item in pairs:
                out.append((f"{name}@{key}", _interpolate(stage["do"]["cmd"], {**params, "key": key, "item": item})))
        elif "matrix" in stage:
            axes = {
                k: (_lookup(params, _REF.fullmatch(v.strip()).group(1)) if isinstance(v, str) else v)
                for k, v in stage["matrix"].items()
            }
            for combo in itertools.product(*axes.values()):
                item = dict(zip(axes, combo))
                label = "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in combo)
                item = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in item.items()}
                out.append((f"{name}@{label}", _interpolate(stage["cmd"], {**params, "item": item})))
        else:
            out.append((name, _interpolate(stage["cmd"], params)))
    return out


# --------------------------------------------------------------------------- sections
def section_env(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        sys.path.insert(0, str(BENCH))
        from mae_throughput import device_peak_tflops

        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            bf16_peak_tflops=device_peak_tflops(torch.device("cuda"), "bf16"),
        )
    else:
        env.update(gpu=None, processor=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        import timm
        import torchvision

        env.update(torchvision=torchvision.__version__, timm=timm.__version__)
    except ImportError as e:
        env["import_error"] = str(e)
    return env


def run_bench(name: str, device: str, limit: float, workdir: Path, smoke_file: Path) -> dict:
    """One benchmark script in its own process; its --json output is the section's result."""
    script = {
        "mae": "mae_throughput.py",
        "ibot": "ibot_throughput.py",
        "detect": "detect_step.py",
        "cka": "cka_speed.py",
    }[name]
    out = workdir / f"{name}.json"
    args = [a.format(smoke_params=smoke_file) for a in BENCH_ARGS[device][name]]
    cmd = [sys.executable, str(BENCH / script), *args, "--device", device, "--json", str(out)]
    if name == "mae" and device == "cpu":
        cmd += ["--threads", "2"]
    proc = _run(cmd, limit, cwd=ROOT)
    result = json.loads(out.read_text()) if out.exists() else {}
    return {"command": " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), **proc, "result": result}


def _run(cmd: list[str], limit: float, cwd: Path, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", (_text(e.stdout) + _text(e.stderr))[-1500:]
    seconds = round(time.perf_counter() - t0, 1)
    return {"rc": rc, "seconds": seconds, **({"tail": tail} if rc != 0 else {})}


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def section_dag(
    device: str, limit: float, workdir: Path, only: list[str] | None = None, keep: Path | None = None
) -> dict:
    """Every stage of dvc.yaml on the shrunk GPU profile, in a scratch copy of the project: through
    ``dvc repro`` where DVC is installed, else each stage's own command in dvc.yaml's order (the device
    image has no DVC). On a CPU, one training stage also runs as two torchrun processes (DDP, gloo).
    ``only``: run these stages (dvc.yaml's names) stage by stage; ``keep``: copy the run's metrics, plots and
    models there afterwards (the report can then be rendered from them on another machine)."""
    project = workdir / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, project / name)
    params = smoke_params(device)
    if not _has("mlflow"):
        params["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if device == "cpu":  # dynamo's graph capture (graph breaks, guards, dynamic shapes) without code generation:
        env["MIMFLOW_COMPILE_BACKEND"] = "eager"  # aot_eager took 55 s per 2-step detect stage, inductor minutes
    dvc = shutil.which("dvc", path=env["PATH"])
    commands = stage_commands(project / "dvc.yaml", params)
    if only:
        unknown = set(only) - {name for name, _ in commands}
        if unknown:
            raise ValueError(f"--stages: unknown {', '.join(sorted(unknown))}; dvc.yaml has {[n for n, _ in commands]}")
        commands = [(name, cmd) for name, cmd in commands if name in only]
    deadline = time.perf_counter() + limit
    if dvc and not only:
        stages = _dag_through_dvc(dvc, project, env, commands, limit)
    else:
        stages = _dag_stage_by_stage(project, env, commands, deadline, limit)
    if device == "cpu" and time.perf_counter() < deadline - 5:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "pipelines.pretrain_mae",
        ]
        print("    pretrain_mae (torchrun, 2 processes) ...", flush=True)
        row = {
            "stage": "pretrain_mae (torchrun --nproc-per-node=2)",
            **_run(argv, deadline - time.perf_counter(), cwd=project, env=env),
            **_stage_speed(project, "pretrain_mae"),
        }
        stages.append(row)
    if keep is not None:
        for name in ("metrics", "plots", "models", "params.yaml"):
            src = project / name
            if src.is_dir():
                shutil.copytree(src, keep / name, dirs_exist_ok=True)
            elif src.exists():
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, keep / name)
    done = [s for s in stages if s.get("rc") == 0]
    return {
        "runner": "dvc repro" if dvc else "stage by stage",
        "launcher": params["runtime"]["launcher"],
        "compile_backend": env.get("MIMFLOW_COMPILE_BACKEND", "inductor"),
        "overrides": str(SMOKE.relative_to(ROOT)),
        "stages": stages,
        "completed": len(done),
        "total": len(stages),
        "all_finite": bool(done) and all(s.get("finite", False) for s in done),
    }


def _dag_through_dvc(dvc: str, project: Path, env: dict, commands: list[tuple[str, str]], limit: float) -> list[dict]:
    (project / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    (project / ".gitignore").write_text("/mlflow.db\n/checkpoints/\n/reports\n")
    git = ["git", "-c", "user.name=gpu-check", "-c", "user.email=gpu-check@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "gpu-check"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    print(f"    dvc repro ({len(commands)} stages) ...", flush=True)
    proc = _run([dvc, "repro"], limit, cwd=project, env=env)
    stages = []
    for stage, _ in commands:
        speed = _stage_speed(project, stage)
        row = {"stage": stage, "rc": 0 if speed else (proc["rc"] or "not run"), **speed}
        stages.append(row)
        print(f"    {stage}: {'done' if speed else 'no metrics'} in {row.get('stage_seconds')} s", flush=True)
    if proc["rc"] != 0:
        stages.append({"stage": "dvc repro", **proc})
    return stages


def _dag_stage_by_stage(
    project: Path, env: dict, commands: list[tuple[str, str]], deadline: float, limit: float
) -> list[dict]:
    stages = []
    for stage, command in commands:
        left = deadline - time.perf_counter()
        if left < 5:
            stages.append({"stage": stage, "rc": "not run (time spent)"})
            continue
        argv = command.split()
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        print(f"    {stage}: {command}", flush=True)
        row = {
            "stage": stage,
            **_run(argv, min(left, STAGE_SHARE * limit), cwd=project, env=env),
            **_stage_speed(project, stage),
        }
        stages.append(row)
        print(
            f"    {stage}: rc {row['rc']} in {row['seconds']} s"
            + (f", {row['images_per_s']} images/s" if row.get("images_per_s") else ""),
            flush=True,
        )
    return stages


def _stage_speed(project: Path, stage: str) -> dict:
    """The stage's images/s (pretraining: median step; finetune/detect: training) and whether every
    number in its metrics file is finite."""
    name, _, variant = stage.partition("@")
    path = project / "metrics" / (f"{name}/{variant}.json" if variant else f"{name}.json")
    if not path.exists():
        return {}
    if str(ROOT) not in sys.path:  # run as a script: benchmarks/ is on the path, the project is not
        sys.path.insert(0, str(ROOT))
    from pipelines.results import read_results

    metrics = read_results(path)  # the numbers and the run info (images/s, seconds: runs/)
    numbers = [v for v in _leaves(metrics) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    speed = metrics.get("images_per_s") or metrics.get("train_images_per_s")
    return {
        "images_per_s": speed,
        "stage_seconds": metrics.get("wall_time_s"),
        "finite": all(math.isfinite(v) for v in numbers),
    }


def _leaves(d):
    for v in d.values() if isinstance(d, dict) else d:
        if isinstance(v, (dict, list)):
            yield from _leaves(v)
        else:
            yield v


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    env = results["env"]
    head = env.get("gpu") or env.get("processor", "cpu")
    lines = [
        f"# gpu-check on {head}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}, "
        f"timm {env.get('timm')}, torchvision {env.get('torchvision')}; {results['date']}, {results['seconds']} s in "
        "all.",
        "",
    ]
    if env.get("gpu"):
        lines += [
            f"{env['gpu']}: {env['gpu_memory_gib']} GiB, {env['multiprocessors']} SMs, bf16 dense peak for MFU "
            f"{env['bf16_peak_tflops']} TFLOP/s.",
            "",
        ]
    lines += ["| section | result |", "|---|---|"]
    for name in SECTIONS[1:]:
        sec = results.get(name)
        lines.append(f"| {name} | {_summary(name, sec)} |")
    dag = results.get("dag") or {}
    if dag.get("stages"):
        lines += [
            "",
            f"Whole DAG on the shrunk profile ({dag['overrides']}; {dag['runner']}, launcher `{dag['launcher']}`, "
            f"torch.compile backend {dag['compile_backend']}):",
            "",
            "| stage | exit | seconds | images/s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['stage']} | {s['rc']} | {s.get('stage_seconds') or s.get('seconds', '')} | "
            f"{s.get('images_per_s') or ''} |"
            for s in dag["stages"]
        ]
    return "\n".join(lines) + "\n"


def _summary(name: str, sec: dict | None) -> str:
    if not sec:
        return "not run"
    if name == "dag":
        return f"{sec['completed']}/{sec['total']} stages completed, metrics finite: {sec['all_finite']}"
    if sec.get("rc") != 0:
        return f"failed (exit {sec.get('rc')}): {(sec.get('tail') or '').strip().splitlines()[-1:] or ''}"
    r = sec["result"]
    if name == "mae":
        runs = {row["impl"]: row for row in r.get("results", [])}
        ours, hf = runs.get("ours", {}), runs.get("hf", {})
        s = f"ours {ours.get('images_per_s')} images/s, peak {ours.get('peak_mem_mb')} MB, MFU {ours.get('mfu')}"
        if hf:
            s += f"; transformers {hf.get('images_per_s')} images/s (x{_fmt(r.get('speedup_vs_transformers'))} ours)"
        return s
    if name == "ibot":
        return (
            f"{r.get('images_per_s')} images/s ({r.get('num_local')} local crops), {r.get('step_ms')} ms/step, "
            f"peak {r.get('peak_memory_mib')} MiB, MFU {r.get('mfu')}"
        )
    if name == "detect":
        sup, st = r.get("supervised", {}), r.get("softteacher", {})
        return (
            f"step {_fmt(sup.get('median_s'))} s supervised, {_fmt(st.get('median_s'))} s Soft Teacher "
            f"(x{_fmt(r.get('ratio_median'))}), {r.get('backbone')}, {r.get('precision')}"
        )
    if name == "cka":
        return (
            f"{r.get('layers')}x{r.get('layers')} layers, {r.get('examples')} examples: accumulator "
            f"{_fmt(r.get('accumulator_s'))} s, per-pair loop {_fmt(r.get('loop_s'))} s (x{_fmt(r.get('speedup'))}), "
            f"max |diff| {_fmt(r.get('max_abs_diff'))}"
        )
    return json.dumps(r)[:300]


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stages", default="", help="the dag section: only these stages (comma-separated), stage by stage")
    ap.add_argument("--keep", type=Path, default=None, help="the dag section: copy metrics/, plots/, models/ here")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit (slow machines)")
    args = ap.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "device": device}
    results["env"] = section_env(device)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", results["env"].get("gpu") or "cpu").strip("-").lower()
    json_path, md_path = args.out / f"gpu-check-{tag}.json", args.out / f"gpu-check-{tag}.md"
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {results['env'].get('gpu') or 'cpu'}: sections {', '.join(wanted)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        smoke_file = workdir / "smoke.params.yaml"
        smoke_file.write_text(yaml.safe_dump(smoke_params(device), sort_keys=False))
        for name in wanted:
            if name == "env":
                continue
            print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
            limit = LIMITS[device][name] * args.time_scale
            try:
                if name == "dag":
                    only = [s.strip() for s in args.stages.split(",") if s.strip()] or None
                    results[name] = section_dag(device, limit, workdir, only, args.keep)
                else:
                    results[name] = run_bench(name, device, limit, workdir, smoke_file)
            except Exception as e:  # noqa: BLE001 (a broken section is reported, the others still run)
                results[name] = {"rc": f"error: {type(e).__name__}: {e}"}
            print(f"[{time.perf_counter() - started:6.0f} s] {name}: {_summary(name, results[name])}", flush=True)
            results["seconds"] = round(time.perf_counter() - started, 1)
            _write(json_path, md_path, results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    _write(json_path, md_path, results)
    print(f"wrote {json_path} and {md_path.name} in {results['seconds']} s", flush=True)
    failed = [
        n
        for n in wanted
        if n != "env"
        and (
            results[n].get("rc", 0) != 0
            if n != "dag"
            else results[n].get("completed") != results[n].get("total") or not results[n].get("total")
        )
    ]
    return 1 if failed else 0


def _write(json_path: Path, md_path: Path, results: dict) -> None:
    for path, text in ((json_path, json.dumps(results, indent=2) + "\n"), (md_path, markdown(results))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
