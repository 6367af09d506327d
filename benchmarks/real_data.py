"""The classification half of the pipeline on real images that ship offline: scikit-learn's digits.

``sklearn.datasets.load_digits`` holds 1,797 handwritten digits (8x8, 17 grey levels) inside the
package. This script exports them as an ImageFolder (upsampled to 32 px, a fixed stratified 80/20
train/held-out split), puts it under ``datasets/digits`` of a temporary copy of the project, points
``prepare.classification`` at it, and runs the real stages with ``dvc repro``: prepare ->
pretrain_mae, pretrain_ibot -> finetune@{scratch,mae,ibot,cnn} and baselines. Everything else is params.yaml's
CPU default, except that flips are off (a mirrored digit is another glyph) and the detection data, which
these stages do not read, is shrunk (``--holdout 0.2`` adds early stopping on a held-out fifth of the
labels, ``finetune.early_stop``, off in the default). The fine-tunes run twice: with the default's step floor
(``finetune.min_steps``, sized so that the shapes' three seeds fit the time budget) and with the floor a small
labeled set wants (``--min-steps``, 500). On the same labeled split and held-out set it
reads the pipeline's own raw-pixel baselines (the ``baselines`` stage: logistic regression and k-NN, as
the results page shows them) and fits scikit-learn's as a cross-check: logistic regression on
standardised pixels and a 5-NN.

    .venv/bin/python benchmarks/real_data.py            # ~6 min on 2 idle cores; writes the two files below
    .venv/bin/python benchmarks/real_data.py --keep /tmp/digits-project --flips   # keep the project; flips on

Writes ``benchmarks/results/real_data.json`` and ``benchmarks/real_data.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from components.data.sources import load_classification_index, open_image  # noqa: E402
from components.io import write_json, write_text  # noqa: E402
from pipelines.results import read_results  # noqa: E402

BIN = Path(sys.executable).parent
COPY = ["components", "pipelines", "datasets", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"]
INITS = ["scratch", "mae", "ibot", "cnn"]
RESULTS = ROOT / "benchmarks" / "results" / "real_data.json"
REPORT = ROOT / "benchmarks" / "real_data.md"


def export_digits(root: Path, size: int = 32, held_out: float = 0.2, seed: int = 0) -> dict:
    """sklearn's digits as ``root/{train,val}/<digit>/<n>.png`` (RGB, ``size`` px, bicubic), stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    idx = np.arange(len(images))
    train, val = train_test_split(idx, test_size=held_out, stratify=digits.target, random_state=seed)
    for split, ids in (("train", train), ("val", val)):
        for i in sorted(ids):
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(path)
    return {"train": len(train), "val": len(val), "classes": 10, "image_size": size}


def make_project(dest: Path) -> None:
    """A fresh git + DVC copy of the project's code (as tests/pipelines/conftest.py makes one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")


def digits_params(flips: bool, threads: int | None, holdout: float, min_steps: int | None = None) -> dict:
    """params.yaml with the digits as classification data; ``min_steps``: finetune's step floor (None: as set)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if min_steps is not None:
        params["finetune"]["min_steps"] = min_steps
    params["runtime"].update(progress=False, threads=threads)
    params["tracking"]["enabled"] = False
    params["prepare"]["classification"].update(source="imagefolder", root="datasets/digits", image_size=32)
    params["prepare"]["detection"].update(num_train=20, num_val=6)  # not read by the classification stages
    params["finetune"]["early_stop"]["holdout_fraction"] = holdout
    if not flips:
        params["pretrain_mae"]["hflip"] = 0.0
        params["pretrain_ibot"]["multicrop"]["hflip"] = 0.0
        params["finetune"]["hflip"] = 0.0
    return params


def env_for(project: Path) -> dict:
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(project),
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
    )
    env.pop("MIMFLOW_PARENT_RUN_ID", None)
    return env


def sh(project: Path, *cmd: str) -> None:
    proc = subprocess.run(list(cmd), cwd=project, env=env_for(project), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def raw_pixels(items) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.asarray(open_image(p), dtype=np.float32).ravel() / 255.0 for p, _ in items])  # [N, 3 * 32 * 32]
    return x, np.array([label for _, label in items])


def baselines(project: Path, params: dict) -> dict:
    """Raw-pixel logistic regression (standardised pixels, L-BFGS to convergence) and 5-NN on the models'
    labeled split, scored on the same held-out images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    ft = params["finetune"]
    index = load_classification_index(project / "data/classification/index.json", root=project / "datasets/digits")
    split = json.loads(
        (project / f"data/classification/splits/labeled_{ft['labeled_percent']:g}_fold{ft['fold']}.json").read_text()
    )
    x, y = raw_pixels([index.train[i] for i in split["labeled"]])
    xv, yv = raw_pixels(index.val)
    scaler = StandardScaler().fit(x)
    logreg = LogisticRegression(max_iter=5000, C=1.0).fit(scaler.transform(x), y)
    knn = KNeighborsClassifier(n_neighbors=5).fit(x, y)
    return {
        "labeled_images": len(y),
        "val_images": len(yv),
        "logistic_top1": round(100.0 * float((logreg.predict(scaler.transform(xv)) == yv).mean()), 2),
        "knn5_top1": round(100.0 * float((knn.predict(xv) == yv).mean()), 2),
    }


def stop_note(m: dict) -> str:
    """Steps run, and where early stopping ended the run and which epoch's state it kept."""
    es = m.get("early_stop")
    if not es:
        return str(m["steps"])
    how = f"stopped at epoch {m['epochs']}" if es["stopped"] else "ran to the end"
    return f"{m['steps']} ({how}; kept epoch {es['best_epoch']}: {es['holdout_top1']:.0f} % on the set-aside labels)"


def claims(models: dict, logistic: float) -> dict:
    """The benchmark's three checks on one set of fine-tunes (``logistic``: the stronger raw-pixel baseline)."""
    best = max(models, key=lambda i: models[i]["top1"])
    both = {"mae", "scratch"} <= models.keys()
    return {
        "best_model": best,
        "best_top1": models[best]["top1"],
        "logistic_top1": logistic,
        "best_minus_logistic": round(models[best]["top1"] - logistic, 2),
        "best_within_5_of_logistic": models[best]["top1"] >= logistic - 5.0,
        "mae_minus_scratch": round(models["mae"]["top1"] - models["scratch"]["top1"], 2) if both else None,
        "mae_beats_scratch": models["mae"]["top1"] > models["scratch"]["top1"] if both else None,
        "ibot_minus_scratch": round(models["ibot"]["top1"] - models["scratch"]["top1"], 2)
        if {"ibot", "scratch"} <= models.keys()
        else None,
        "scratch_minus_own_probe": round(models["scratch"]["top1"] - models["scratch"]["linear_probe_top1"], 2)
        if "scratch" in models
        else None,
        "scratch_not_below_own_probe": models["scratch"]["top1"] >= models["scratch"]["linear_probe_top1"]
        if "scratch" in models
        else None,
    }


def claim_lines(c: dict, missing: list[str]) -> list[str]:
    verdict = {True: "holds", False: "fails"}
    return [
        f"- best fine-tuned model ({c['best_model']}, {c['best_top1']:.1f}) within 5 points of the stronger "
        f"logistic baseline ({c['logistic_top1']:.1f}): **{verdict[c['best_within_5_of_logistic']]}** "
        f"({c['best_minus_logistic']:+.1f})" + (f" (models not run: {', '.join(missing)})" if missing else ""),
        f"- MAE-init beats scratch: **{verdict[c['mae_beats_scratch']]}** ({c['mae_minus_scratch']:+.1f})"
        if c["mae_beats_scratch"] is not None
        else "- MAE-init beats scratch: not measured (a model did not run)",
        f"- fine-tuned scratch ViT not worse than the linear probe of its own random init: "
        f"**{verdict[c['scratch_not_below_own_probe']]}** ({c['scratch_minus_own_probe']:+.1f})"
        if c["scratch_not_below_own_probe"] is not None
        else "- scratch ViT against its own probe: not measured (it did not run)",
    ]


def model_rows(m: dict, missing: list[str]) -> list[str]:
    nan = float("nan")
    rows = [
        f"| {'CNN (ResNet-18, width 16)' if i == 'cnn' else 'ViT ' + i} | {m[i]['top1']:.1f} | "
        f"{m[i].get('best_top1', nan):.1f} | "
        + ("– | – |" if i == "cnn" else f"{m[i].get('linear_probe_top1', nan):.1f} | {m[i].get('knn_top1', nan):.1f} |")
        + f" {stop_note(m[i])} |"
        for i in INITS
        if i in m
    ]
    return rows + [f"| {'CNN' if i == 'cnn' else 'ViT ' + i} | not run (see above) | | | | |" for i in missing]


def report(results: dict) -> str:
    b, runs = results["baselines"], results["runs"]
    es = results["params"]["early_stop"]
    held = next((v["holdout_images"] for r in runs for v in r["models"].values() if "holdout_images" in v), 0)
    early = (
        f"Fine-tuning stops early (`finetune.early_stop`, off in the default): {held} of the {b['labeled_images']} "
        f"labels ({es['holdout_fraction']:g} of each class, fixed by the seed) are set aside and scored every "
        f"`eval_every` epochs; a run stops after {es['patience']} scores without gain and keeps its best state. "
        "The models train on the rest; the baselines on all the labels."
        if es["holdout_fraction"] > 0
        else "No early stopping (`finetune.early_stop.holdout_fraction` 0, as the default)."
    )
    baseline_rows = [
        *(
            [
                f"| raw pixels: logistic regression (the `baselines` stage) | {b['pipeline_logistic_top1']:.1f}"
                " | | | | |",
                f"| raw pixels: k-NN (the `baselines` stage) | {b['pipeline_knn_top1']:.1f} | | | | |",
            ]
            if "pipeline_logistic_top1" in b
            else []
        ),
        f"| raw pixels: logistic regression (scikit-learn, standardised) | {b['logistic_top1']:.1f} | | | | |",
        f"| raw pixels: 5-NN (scikit-learn) | {b['knn5_top1']:.1f} | | | | |",
    ]
    sections = []
    for r in runs:
        title = (
            f"## `finetune.min_steps: {r['min_steps']}`, params.yaml's default (sized for the shapes' seeds)"
            if r["min_steps"] == results["params"]["min_steps"]
            else f"## `finetune.min_steps: {r['min_steps']}`: what a small labeled set wants"
        )
        sections += [
            title,
            "",
            "| model | fine-tune top-1 | best eval top-1 | linear probe (frozen init) | k-NN (frozen init) | steps |",
            "|---|---|---|---|---|---|",
            *model_rows(r["models"], r["missing"]),
            *baseline_rows,
            "",
            *claim_lines(r["claims"], r["missing"]),
            "",
        ]
    floors = " and ".join(str(r["min_steps"]) for r in runs)
    return "\n".join(
        [
            "# Real data: scikit-learn's digits through the classification half of the DAG",
            "",
            "Generated by `benchmarks/real_data.py` (numbers in `benchmarks/results/real_data.json`); rerun it to",
            "reproduce them. 1,797 handwritten digits of scikit-learn (8x8, upsampled to 32 px), a fixed stratified",
            f"split of {results['data']['train']} training and {results['data']['val']} held-out images, "
            f"{b['labeled_images']} labeled ({results['params']['labeled_percent']:g} %) for fine-tuning. The "
            "pipeline ran",
            "`dvc repro baselines finetune@{scratch,mae,ibot,cnn}-0` with params.yaml's CPU default",
            "unchanged except the data "
            f"root{'' if results['params']['flips'] else ' and flips off (a mirrored digit is another glyph)'},",
            f"once per fine-tuning step floor (`finetune.min_steps` {floors}; at batch 32 the 144 labels make",
            "4 steps an epoch, so the floor sets the schedule's length; the pretrained encoders are the same).",
            early,
            f"Machine: {results['machine']}. One seed (runtime.seed "
            f"{results['params']['seed']}): an anecdote, not a claim over seeds.",
            *([results["note"], ""] if results.get("note") else [""]),
            "Fine-tune top-1: the "
            f"{'kept' if es['holdout_fraction'] > 0 else 'final'} state on the 360 held-out images; best eval "
            "top-1: the best of the evaluations every `eval_every` epochs on those same images (shown, never used "
            "to choose).",
            "",
            *sections,
        ]
    )


def collect(finetune_dir: Path) -> dict:
    """The seed-0 fine-tunes' metrics present in ``finetune_dir`` (init -> the keys the report reads)."""
    keys = (
        "top1",
        "best_top1",
        "best_epoch",
        "epochs",
        "steps",
        "linear_probe_top1",
        "knn_top1",
        "labeled_images",
        "holdout_images",
        "early_stop",
        "train_s",
    )
    return {
        i: {k: v for k, v in read_results(finetune_dir / f"{i}-0.json").items() if k in keys}
        for i in INITS
        if (finetune_dir / f"{i}-0.json").is_file()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--keep", type=Path, default=None, help="build the project here and keep it (default: a temp dir, removed)"
    )
    ap.add_argument("--flips", action="store_true", help="keep the default horizontal flips")
    ap.add_argument("--threads", type=int, default=None, help="runtime.threads of the stages")
    ap.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="finetune.early_stop.holdout_fraction: labels set aside for early stopping (0: off, as the default)",
    )
    ap.add_argument(
        "--min-steps",
        type=int,
        default=500,
        help="finetune.min_steps of the second set of fine-tunes (the default's floor always runs first; 0: skip)",
    )
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("--note", default="", help="a sentence for real_data.md on how this run was made")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="with --keep --resume: no dvc repro, only collect the metrics the last run kept per floor",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="with --keep: refresh the code of a kept project and `dvc repro` again "
        "(stages whose code and params did not change are skipped)",
    )
    args = ap.parse_args()
    project = args.keep or Path(tempfile.mkdtemp(prefix="mimflow-digits-"))
    params = digits_params(args.flips, args.threads, args.holdout)
    default_floor = params["finetune"]["min_steps"]
    floors = [default_floor] + ([args.min_steps] if args.min_steps and args.min_steps != default_floor else [])
    runs = []
    try:
        if args.resume and args.keep and (project / "dvc.lock").is_file():
            for name in ("components", "pipelines"):
                shutil.rmtree(project / name)
            make_project(project)
            data = json.loads((project / "metrics" / "prepare.json").read_text())["classification"]
            data = {"train": data["train"], "val": data["val"], "classes": data["classes"], "image_size": 32}
        else:
            make_project(project)
            data = export_digits(project / "datasets" / "digits")
            for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "digits"]):
                sh(project, *cmd)
        for floor in floors:
            kept = project / "bench" / f"min_steps-{floor}"  # each floor's metrics, for --collect
            if not args.collect:
                run_params = params | {"finetune": params["finetune"] | {"min_steps": floor}}
                write_text(project / "params.yaml", yaml.safe_dump(run_params, sort_keys=False))
                sh(project, str(BIN / "dvc"), "repro", "baselines", *[f"finetune@{i}-0" for i in INITS])
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(project / "metrics" / "finetune", kept)
            models = collect(kept if kept.is_dir() else project / "metrics" / "finetune")
            runs.append({"min_steps": floor, "models": models})
        pre = {
            s: {
                k: v
                for k, v in read_results(project / f"metrics/{s}.json").items()
                if k in ("steps", "epochs", "val_masked_loss", "knn_top1", "wall_time_s")
            }
            for s in ("pretrain_mae", "pretrain_ibot")
            if (project / f"metrics/{s}.json").is_file()
        }
        base = baselines(project, params)
        if (project / "metrics/baselines.json").is_file():
            stage = read_results(project / "metrics/baselines.json")
            base |= {"pipeline_logistic_top1": stage["logistic_top1"], "pipeline_knn_top1": stage["knn_top1"]}
    finally:
        if args.keep is None:
            shutil.rmtree(project, ignore_errors=True)
    logistic = max(base["logistic_top1"], base.get("pipeline_logistic_top1", 0.0))  # the stronger of the two
    for r in runs:
        r["missing"] = [i for i in INITS if i not in r["models"]]  # only with --collect, before every stage has run
        r["claims"] = claims(r["models"], logistic)
    results = {
        "data": {"source": "sklearn.datasets.load_digits", **data},
        "params": {
            "flips": args.flips,
            "seed": params["runtime"]["seed"],
            "labeled_percent": params["finetune"]["labeled_percent"],
            "early_stop": params["finetune"]["early_stop"],
            "min_steps": default_floor,
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads or 'default'}",
        "note": args.note,
        "baselines": base,
        "pretraining": pre,
        "runs": runs,
    }
    print(json.dumps(results, indent=2))
    if not args.no_write:
        write_json(RESULTS, results)
        write_text(REPORT, report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
