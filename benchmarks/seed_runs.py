"""Run the finetune and detect matrix over seeds as parallel processes (no DVC, no MLflow), time each run
and judge the claims: how much a seed costs, and what the claims say with n seeds, on a machine with
more cores than the 2-core default target.

    python benchmarks/seed_runs.py --seeds 0 1 2 3 --jobs 8 --threads 2 --out /tmp/seeds

Each run is ``python -m pipelines.<stage> --params <copy> ...`` with ``runtime.threads`` = ``--threads``
and tracking off, in a copy of the project under ``--out``; per-run wall times (process start included)
go to ``runs.json``, the claims (``pipelines.claims``) for the first 2, 3, ... seeds to ``claims.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.claims import build_claims  # noqa: E402
from pipelines.results import read_results  # noqa: E402

START = time.perf_counter()
BUDGET_S = [float("inf")]


def run(cmd: list[str], cwd: Path, log: Path) -> dict:
    t = time.perf_counter()
    if t - START > BUDGET_S[0]:
        return {"cmd": " ".join(cmd[:1] + cmd[3:]), "rc": None, "wall_s": 0.0, "skipped": "past --budget-s"}
    with log.open("w") as f:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p),
        }  # the copy's code, also where the project is pip-installed in editable mode
        rc = subprocess.run(
            [sys.executable, "-m", *cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env
        ).returncode
    return {"cmd": " ".join(cmd[:1] + cmd[3:]), "rc": rc, "wall_s": round(time.perf_counter() - t, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="overrides section.key=yaml-value, e.g. finetune.epochs=20")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    args = ap.parse_args()
    BUDGET_S[0] = args.budget_s

    work = args.out / "project"
    if work.exists():
        shutil.rmtree(work)
    outputs = {
        ".git",
        ".venv",
        ".whl",
        "data",
        "models",
        "metrics",
        "runs",
        "plots",
        "checkpoints",
        "reports",
        "mlflow.db",
        "benchmarks",
    }
    shutil.copytree(
        ROOT,
        work,
        ignore=lambda d, names: [n for n in names if n == "__pycache__" or (Path(d) == ROOT and n in outputs)],
    )
    params = yaml.safe_load(args.params.read_text())
    params["runtime"].update(threads=args.threads, device="cpu", progress=False)
    params["tracking"]["enabled"] = False
    params["finetune"]["seeds"] = params["detect"]["seeds"] = list(args.seeds)
    for item in args.set:
        key, value = item.split("=", 1)
        node = params
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)
    p = work / "seeds.params.yaml"
    p.write_text(yaml.safe_dump(params))
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pp = ["--params", str(p)]

    records = [run(["pipelines.prepare", *pp], work, logs / "prepare.log")]
    first = [["pipelines.pretrain_mae", *pp], ["pipelines.pretrain_ibot", *pp], ["pipelines.baselines", *pp]]
    with ThreadPoolExecutor(3) as pool:
        records += list(pool.map(lambda c: run(c, work, logs / f"{c[0].split('.')[1]}.log"), first))
    matrix = [
        ["pipelines.detect", *pp, "--variant", f"{m}-{pct:g}", "--seed", str(s)]
        for s in args.seeds
        for pct in params["prepare"]["detection"]["labeled_percents"]
        for m in ("softteacher", "supervised")
    ]
    matrix += [
        ["pipelines.finetune", *pp, "--init", i, "--seed", str(s)]
        for s in args.seeds
        for i in ("mae", "scratch", "ibot", "cnn")
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        records += list(pool.map(lambda c: run(c, work, logs / ("_".join(c[4:]) + ".log")), matrix))
    (args.out / "runs.json").write_text(json.dumps(records, indent=1))

    ft = [read_results(f) for f in sorted((work / "metrics" / "finetune").glob("*.json"))]
    det = [read_results(f) for f in sorted((work / "metrics" / "detect").glob("*.json"))]
    base = read_results(work / "metrics" / "baselines.json")
    judged = {}
    done = [s for s in args.seeds if all(r["rc"] == 0 for r in records if r["cmd"].endswith(f"--seed {s}"))]
    for n in range(2, len(done) + 1):
        keep = set(done[:n])
        judged[n] = [
            c.judge()
            for c in build_claims([m for m in ft if m["seed"] in keep], [m for m in det if m["seed"] in keep], base)
        ]
    (args.out / "claims.json").write_text(
        json.dumps({"runs": records, "claims": judged, "finetune": ft, "detect": det, "baselines": base}, indent=1)
    )
    for n, claims in judged.items():
        print(f"--- {n} seeds")
        for c in claims:
            ci = "-" if c["ci_low"] is None else f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
            print(
                f"{c['id']:52s} {c['verdict']:13s} diff {c['diff']:8.3f} {ci}  "
                f"A {c['a']['mean']:.3f} B {c['b']['mean']:.3f}"
            )
    for r in records:
        print(f"{r['wall_s']:8.1f} s rc {r['rc']} {r['cmd']}")
    return 0 if all(r["rc"] in (0, None) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
