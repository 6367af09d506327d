"""Stage ``report``: one page with every table and figure of the pipeline.

Reads the metrics files and figures the other stages wrote (the paths dvc.yaml gives this stage as
deps) and writes ``reports/summary.md`` (tables) and ``reports/index.html`` (the same tables and the
figures, copied into ``reports/figures/`` so the page is self-contained). Logged to MLflow; under the
Prefect flow the summary is also published as a Markdown artifact (by the flow's stage task).
"""
from __future__ import annotations

import html
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from components.io import write_text
from pipelines.common import StageContext, run_stage

log = logging.getLogger("mimflow.report")

FINETUNE_INITS = ("scratch", "mae", "ibot", "cnn")
DETECT_METHODS = ("supervised", "softteacher")  # dvc.yaml's detect matrix, with prepare.detection.labeled_percents


def detect_metrics_files(metrics: Path, percents: list[float]) -> list[Path]:
    """The metrics of the detect stages params.yaml asks for now; files of earlier percents may
    linger in metrics/detect and are left out."""
    return [metrics / "detect" / f"{method}-{p:g}.json" for p in sorted(percents) for method in DETECT_METHODS]


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found (run the stage that writes it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def pick(d: dict, *keys: str) -> Any:
    """The first of ``keys`` present in ``d`` (dotted keys reach into nested dicts)."""
    for key in keys:
        node: Any = d
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


class Table:
    def __init__(self, title: str, columns: list[str], note: str = ""):
        self.title, self.columns, self.note, self.rows = title, columns, note, []

    def add(self, *cells: Any) -> None:
        self.rows.append([fmt(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<section><h2>{html.escape(self.title)}</h2>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"


def pretraining_table(metrics: Path) -> Table:
    t = Table("Pretraining", ["method", "final train loss", "held-out loss", "k-NN top-1 (%)", "images/s", "wall time (s)"])
    mae = read_metrics(metrics / "pretrain_mae.json")
    t.add("MAE", mae.get("train_loss"), mae.get("val_masked_loss"), None, mae.get("images_per_s"), mae.get("wall_time_s"))
    ibot = read_metrics(metrics / "pretrain_ibot.json")
    t.add("iBOT", ibot.get("loss"), None, ibot.get("knn_top1"), ibot.get("images_per_s"), ibot.get("wall_time_s"))
    return t


def finetune_table(metrics: Path) -> Table:
    t = Table("Classification (held-out top-1 %)", ["init", "fine-tune top-1", "top-5", "linear probe top-1", "k-NN top-1", "best epoch", "wall time (s)"])
    for init in FINETUNE_INITS:
        m = read_metrics(metrics / "finetune" / f"{init}.json")
        t.add(init, pick(m, "top1"), pick(m, "top5"), m.get("linear_probe_top1"), pick(m, "knn_top1"), pick(m, "best_epoch"), pick(m, "wall_time_s"))
    return t


def detection_table(metrics: Path, percents: list[float]) -> Table:
    t = Table("Detection (COCO mAP on held-out scenes, pycocotools)", ["method", "labeled %", "AP (teacher)", "AP50", "AP75", "AP (student)", "wall time (s)"])
    for path in detect_metrics_files(metrics, percents):
        method, pct = path.stem.rsplit("-", 1)
        m = read_metrics(path)
        t.add(method, pct, pick(m, "teacher.AP"), pick(m, "teacher.AP50"), pick(m, "teacher.AP75"), pick(m, "student.AP"), m.get("wall_time_s"))
    return t


def cka_table(metrics: Path) -> Table:
    m = read_metrics(metrics / "cka.json")
    kind = f"{'debiased' if m.get('debiased') else 'biased'}, {m.get('kernel', 'linear')} kernel"
    t = Table(
        f"CKA ({kind}, {m.get('images', '?')} held-out images)",
        ["pair", "layers", "mean CKA", "lowest layers", "top ViT layer vs best CNN layer"],
        note=("What to compare with (Raghu et al. 2021, on ImageNet-scale models): a ViT's layers are more alike across depth "
              "than a ResNet's, the lowest layers of the two agree, and the top ViT layers match no ResNet layer well. "
              "'mean CKA': the mean over every layer pair; 'lowest layers': the first layer of each; "
              "'top ViT layer vs best CNN layer': the best CKA of the last ViT block with any CNN layer."),
    )
    for name, pair in (m.get("pairs") or {}).items():
        summary = (m.get("summary") or {}).get(name, {})
        matrix = pair.get("cka") or []
        t.add(name.replace("__", " vs "), f"{len(matrix)}×{len(matrix[0]) if matrix else 0}", summary.get("mean"), summary.get("lowest_layers"), summary.get("top_vit_best_cnn"))
    return t


def stage_times(metrics: Path, percents: list[float]) -> Table:
    t = Table("Wall time per stage", ["stage", "seconds"])
    current = set(detect_metrics_files(metrics, percents))
    for path in sorted(metrics.rglob("*.json")):
        if path.parent == metrics / "detect" and path not in current:
            continue
        m = read_metrics(path)
        if "wall_time_s" in m:
            t.add(str(path.relative_to(metrics).with_suffix("")), m["wall_time_s"])
    return t


def collect_figures(plots: Path, out: Path) -> list[tuple[str, Path]]:
    """Copy every PNG under plots/ into reports/figures/, returning (caption, copied path)."""
    if out.exists():
        shutil.rmtree(out)
    figures = []
    for png in sorted(plots.rglob("*.png")):
        rel = png.relative_to(plots)
        dest = out / "__".join(rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, dest)
        figures.append((str(rel.with_suffix("")), dest))
    return figures


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .7rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: .5rem; vertical-align: top; max-width: 560px; }}
figure img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: .85rem; color: #555; }}
.note {{ color: #555; font-size: .9rem; }}
</style></head>
<body>
<h1>{title}</h1>
{tables}
<h2>Figures</h2>
{figures}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figures = ok + "/" + imgs.length;
}});
</script>
</body></html>
"""


def report(ctx: StageContext) -> dict:
    """Write reports/summary.md and reports/index.html from every stage's metrics and figures."""
    metrics, plots, out = ctx.root / "metrics", ctx.root / "plots", ctx.root / "reports"
    percents = ctx.params.prepare.detection.labeled_percents
    tables = [pretraining_table(metrics), finetune_table(metrics), detection_table(metrics, percents), cka_table(metrics), stage_times(metrics, percents)]
    title = ctx.section.title
    summary = f"# {title}\n\n" + "\n".join(t.markdown() for t in tables)
    figures = collect_figures(plots, out / "figures")
    figure_html = "\n".join(
        f"<figure><img src='{html.escape(str(p.relative_to(out)))}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>" for c, p in figures
    )
    page = PAGE.format(title=html.escape(title), tables="\n".join(t.html() for t in tables), figures=figure_html)
    write_text(out / "summary.md", summary)
    write_text(out / "index.html", page)
    if ctx.is_main:
        ctx.tracker.log_artifact(out, "report")
    log.info("report: %s (%d tables, %d figures)", out / "index.html", len(tables), len(figures))
    return {"tables": len(tables), "figures": len(figures)}


if __name__ == "__main__":
    run_stage("report", report)
