"""The README's results table, generated from the committed metrics of the default run.

``python -m pipelines.readme_results`` rewrites the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in README.md from ``metrics/*.json``; ``--check`` only compares and exits 1
when the README is out of date. The machine and date of the run are not in the metrics: pass them with
``--machine`` and ``--date`` after a new run; otherwise the ones already in the block are kept.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

from pipelines.results import read_results

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PROVENANCE = re.compile(r"^Measured on (?P<date>\d{4}-\d{2}-\d{2}), on (?P<machine>.+?), by `make repro`")
FINETUNE_ORDER = ["scratch", "mae", "ibot", "cnn"]
FINETUNE_NAMES = {
    "scratch": "ViT from scratch",
    "mae": "ViT from MAE",
    "ibot": "ViT from iBOT",
    "cnn": "CNN (ResNet) from scratch",
}


class ResultsError(ValueError):
    """A metrics file or the README block is missing or malformed; the message names the file."""


def _read(path: Path) -> dict:
    """A metrics file merged with its run info (timings, strings: ``runs/``, pipelines/results.py)."""
    try:
        return read_results(path)
    except FileNotFoundError:
        raise ResultsError(f"{path}: metrics file not found (run `dvc repro` first)") from None
    except ValueError as e:
        raise ResultsError(str(e)) from None


def _get(data: dict, path: Path, *keys: str):
    value = data
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise ResultsError(f"{path}: missing key {'.'.join(keys)}")
        value = value[key]
    return value


def _seconds(data: dict, path: Path) -> str:
    return f"{_get(data, path, 'wall_time_s'):.0f}"


def _ap(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def load_metrics(root: Path) -> dict[str, tuple[Path, dict]]:
    """Every metrics file of the default run, keyed by stage id (``finetune@mae``), in the DAG's order."""
    m = root / "metrics"
    out = {
        name: (m / f"{name}.json", _read(m / f"{name}.json")) for name in ("prepare", "pretrain_mae", "pretrain_ibot")
    }

    def ordered(files: list[Path]) -> list[Path]:
        rank = {n: i for i, n in enumerate(FINETUNE_ORDER)}
        return sorted(files, key=lambda p: (rank.get(p.stem.split("-")[0], len(rank)), p.stem))

    for path in ordered(list((m / "finetune").glob("*.json"))):
        out[f"finetune@{path.stem}"] = (path, _read(path))
    for path in sorted((m / "detect").glob("*.json"), key=lambda p: (not p.stem.startswith("supervised"), p.stem)):
        out[f"detect@{path.stem}"] = (path, _read(path))
    out["cka"] = (m / "cka.json", _read(m / "cka.json"))
    return out


def _row(stage: str, path: Path, d: dict) -> str:
    if stage == "prepare":
        c, det = _get(d, path, "classification"), _get(d, path, "detection")
        result = (
            f"{c['train']:,} + {c['val']:,} classification images ({c['classes']} classes); "
            f"{det['train_images']:,} + {det['val_images']:,} detection scenes ({det['train_boxes']:,} + "
            f"{det['val_boxes']:,} boxes)"
        )
    elif stage == "pretrain_mae":
        result = (
            f"MAE, {_get(d, path, 'epochs')} epochs: held-out masked-patch loss "
            f"{_get(d, path, 'val_masked_loss'):.3f} (train loss {_get(d, path, 'train_loss_first'):.2f} -> "
            f"{_get(d, path, 'train_loss'):.2f}), "
            f"{_get(d, path, 'images_per_s'):.0f} images/s"
        )
    elif stage == "pretrain_ibot":
        result = (
            f"iBOT, {_get(d, path, 'epochs')} epochs: teacher k-NN {_get(d, path, 'knn_top1'):.1f} % "
            f"(chance {_get(d, path, 'knn_chance'):.1f} %), teacher_kl {_get(d, path, 'teacher_kl'):.2f}"
        )
    elif stage.startswith("finetune@"):
        init = str(_get(d, path, "init"))
        result = (
            f"{FINETUNE_NAMES.get(init, init)}, {_get(d, path, 'labeled_images')} labels: "
            f"top-1 **{_get(d, path, 'top1'):.1f} %**"
        )
        extra = [
            f"{name} {d[key]:.1f}"
            for key, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "k-NN"))
            if key in d
        ]
        if extra:
            result += f" ({', '.join(extra)})"
    elif stage.startswith("detect@"):
        method = "Soft Teacher" if _get(d, path, "method") == "softteacher" else "supervised baseline"
        student = _get(d, path, "student")
        scenes = f"{_get(d, path, 'labeled_images')} labeled"
        if _get(d, path, "unlabeled_images"):
            scenes += f" + {d['unlabeled_images']} unlabeled"
        result = (
            f"{method}, {scenes} scenes, {_get(d, path, 'steps')} steps: teacher AP **{_ap(_get(d, path, 'AP'))}** "
            f"(AP50 {_ap(_get(d, path, 'AP50'))}), student AP {_ap(student.get('AP'))}"
        )
    elif stage == "cka":
        s = _get(d, path, "summary", "finetuned__cnn")
        which = Path(str(_get(d, path, "models", "finetuned", "path"))).name
        result = (
            f"fine-tuned ViT (`finetune@{which}`) vs CNN: lowest layers {s['lowest_layers']:.2f}, "
            f"top ViT block vs its best CNN layer {s['top_vit_best_cnn']:.2f}"
        )
    else:  # pragma: no cover - load_metrics yields only the stages above
        raise ResultsError(f"{path}: no row for stage {stage}")
    return f"| `{stage}` | {result} | {_seconds(d, path)} |"


def render(root: Path, machine: str, date: str) -> str:
    """The block between the markers (markers excluded), ending in a newline."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ResultsError(f"date {date!r}: expected YYYY-MM-DD")
    if not machine.strip() or "\n" in machine:
        raise ResultsError(f"machine {machine!r}: expected one line of text")
    metrics = load_metrics(root)
    total = sum(float(d.get("wall_time_s", 0.0)) for _, d in metrics.values())
    seeds = {stage.rsplit("-", 1)[1] for stage in metrics if "@" in stage}
    first = min(seeds, key=int) if seeds else None
    shown = {k: v for k, v in metrics.items() if "@" not in k or k.rsplit("-", 1)[1] == first}
    lines = [
        f"Measured on {date}, on {machine}, by `make repro` from a fresh clone with the committed params.yaml.",
        f"The {len(metrics)} stages' wall times add up to {total / 60:.1f} min (Python start-up and DVC excluded).",
        *(
            [f"Fine-tune and detection rows show seed {first}; the claims table below has every seed."]
            if len(seeds) > 1
            else []
        ),
        "",
        "| stage | result | wall time (s) |",
        "|---|---|---|",
        *(_row(stage, path, d) for stage, (path, d) in shown.items()),
    ]
    return "\n".join(lines) + "\n"


def split_readme(text: str, path: Path) -> tuple[str, str, str]:
    """(before, block, after) around the markers; the markers stay in before/after."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ResultsError(f"{path}: needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    block, tail = rest.split(END)
    return head + BEGIN + "\n", block.strip("\n") + "\n", END + tail


def provenance(block: str, path: Path) -> tuple[str, str]:
    """(machine, date) recorded in the block's first line."""
    match = PROVENANCE.match(block)
    if not match:
        raise ResultsError(
            f"{path}: the results block does not start with 'Measured on YYYY-MM-DD, on <machine>, "
            "by `make repro`'; pass --machine and --date"
        )
    return match["machine"], match["date"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.readme_results", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--root", type=Path, default=ROOT, help="the project whose metrics/ to read")
    parser.add_argument("--machine", help="the machine the default run was measured on (default: keep the README's)")
    parser.add_argument("--date", help="the day of that run, YYYY-MM-DD (default: keep the README's)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the README is out of date")
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text(encoding="utf-8")
        head, block, tail = split_readme(text, args.readme)
        machine, date = provenance(block, args.readme) if not (args.machine and args.date) else (None, None)
        new_block = render(args.root, args.machine or machine, args.date or date)
    except (OSError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if new_block == block:
        return 0
    if args.check:
        print(
            f"error: {args.readme}: the results block differs from metrics/; run python -m pipelines.readme_results",
            file=sys.stderr,
        )
        return 1
    fd, tmp = tempfile.mkstemp(prefix=f".{args.readme.name}.", dir=args.readme.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(head + new_block + tail)
    os.chmod(tmp, stat.S_IMODE(args.readme.stat().st_mode))  # mkstemp's 0600 -> the README's own mode
    os.replace(tmp, args.readme)
    print(f"{args.readme}: results block rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
