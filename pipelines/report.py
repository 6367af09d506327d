"""Stage ``report``: the claims over seeds, then one page with every table and figure of the pipeline.

Which results belong on the page is what the current dvc.yaml and params define, read through DVC's
own index of stages (``current_stages``): the metrics files and figures those stages declare, never
a glob of ``metrics/`` or ``plots/``, so files left by stages no longer in the DAG (another labeled
percent, a dropped seed) are not shown. Writes ``reports/claims.json`` (every claim: n, each side's
mean and s.e., the paired difference with its 95 % t interval, the verdict), ``metrics/claims.json``
(the numbers, for ``dvc metrics show``; ``python -m pipelines.report --readme README.md`` writes their
table between the README's ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` markers, ``--check``
only compares), ``reports/claims.md`` (the page's claims table), ``reports/summary.md`` and
``reports/index.html`` (claims table and per-seed dot plot first, then the tables and the figures,
copied into ``reports/figures/`` so the page is self-contained). Logged to MLflow; under the Prefect
flow the summary is also published as a Markdown artifact (by the flow's stage task).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.evaluation.stats import mean_se
from components.io import write_json, write_text
from pipelines import layout
from pipelines.claims import build_claims, claims_metrics, readme_block
from pipelines.common import StageContext, run_stage
from pipelines.results import read_results

log = logging.getLogger("mimflow.report")

README_BEGIN, README_END = "<!-- claims:begin -->", "<!-- claims:end -->"


@dataclass
class StageOutputs:
    """One stage of the current DAG: its DVC name, metrics files and PNG figures (existing or not)."""

    name: str
    metrics: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.name.split("@")[0]


def current_stages(root: Path) -> list[StageOutputs]:
    """Every stage dvc.yaml defines under the current params (matrix items expanded), through DVC's
    index: metrics outputs, and figures: PNG outputs and the PNGs inside directory outputs under plots/."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        out = []
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            s = StageOutputs(stage.addressing)
            for o in stage.outs:
                path = root / str(o.def_path)
                if o.metric:
                    s.metrics.append(path)
                elif path.suffix == ".png":
                    s.figures.append(path)
                elif path.is_dir() and str(o.def_path).startswith("plots"):
                    s.figures.extend(sorted(path.rglob("*.png")))
            out.append(s)
    return out


def read_metrics(path: Path) -> dict:
    """A stage's metrics file merged with its run info (timings, strings: ``runs/``)."""
    return read_results(path)


def stage_metrics(stages: list[StageOutputs], base: str) -> list[dict]:
    """The metrics of every current stage named ``base`` (``finetune`` -> every finetune@<init>-<seed>)."""
    return [read_metrics(p) for s in stages if s.base == base for p in s.metrics]


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


def mean_pm(values: list[float], digits: int = 2) -> str:
    """'24.87 ± 0.31' (mean ± s.e. over seeds), '24.87' for one value, '—' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, se = mean_se(values)
    return fmt(mean, digits) if se is None else f"{fmt(mean, digits)} ± {fmt(se, digits)}"


class Table:
    def __init__(self, title: str, columns: list[str], note: str = ""):
        self.title, self.columns, self.note, self.rows = title, columns, note, []

    def add(self, *cells: Any) -> None:
        self.rows.append([fmt(c) for c in cells])

    def markdown(self, heading: bool = True) -> str:
        lines = [f"## {self.title}", ""] if heading else []
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f"<section><h2>{html.escape(self.title)}</h2>{note}{table}</section>"


def claims_table(judged: list[dict]) -> Table:
    t = Table(
        "Claims",
        ["claim", "verdict", "difference (A − B)", "95 % CI", "n", "A: mean ± s.e.", "B: mean ± s.e.", "test"],
        note=(
            "Each claim compares A with B over seeds; runs of one seed share the labeled split, data order and init "
            "and are "
            "paired. holds: the 95 % t interval of the mean difference lies above 0; inside noise: it contains 0; "
            "reversed: it lies below 0."
        ),
    )

    def side(s: dict) -> str:
        return f"{s['label']}: {fmt(s['mean'], 3)}" + ("" if s["se"] is None else f" ± {fmt(s['se'], 3)}")

    for c in judged:
        ci = "—" if c["ci_low"] is None else f"[{fmt(c['ci_low'], 3)}, {fmt(c['ci_high'], 3)}]"
        t.add(c["claim"], c["verdict"], fmt(c["diff"], 3), ci, c["n"], side(c["a"]), side(c["b"]), c["test"])
    return t


def claims_figure(judged: list[dict], path: Path, ctx: StageContext | None = None) -> None:
    """Per claim, one row: each seed's difference A − B as a dot, the mean and its 95 % interval as a bar,
    and 0 as a dashed line (a dot plot per claim; each row has its own scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(judged), 1, figsize=(8, 0.9 * len(judged) + 0.6), squeeze=False)
    colours = {"holds": "#1a7f37", "inside noise": "#9a6700", "reversed": "#cf222e", "too few seeds": "#57606a"}
    for ax, c in zip(axes[:, 0], judged):
        a, b = c["a"]["values"], c["b"]["values"]
        if "-1" in b:  # a fixed value (the raw-pixel baseline)
            diffs = [v - b["-1"] for v in a.values()]
        else:  # paired seeds; Welch's unpaired sides have no per-seed difference to draw
            diffs = [a[s] - b[s] for s in map(str, c["seeds"])]
        colour = colours[c["verdict"]]
        ax.axvline(0, color="#888", ls="--", lw=1)
        if c["ci_low"] is not None:
            ax.plot([c["ci_low"], c["ci_high"]], [0, 0], color=colour, lw=3, alpha=0.5, solid_capstyle="butt")
        ax.plot([c["diff"]], [0], marker="|", ms=14, color=colour, mew=2)
        ax.plot(diffs, [0] * len(diffs), "o", color=colour, ms=5, alpha=0.8)
        ax.set_yticks([])
        ax.set_title(f"{c['claim']}: {c['verdict']} (n = {c['n']})", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        lo = min([0.0, *diffs, *(v for v in (c["ci_low"], c["ci_high"]) if v is not None)])
        hi = max([0.0, *diffs, *(v for v in (c["ci_low"], c["ci_high"]) if v is not None)])
        pad = 0.1 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    layout.write_figure(fig, path, ctx)


def pretraining_table(stages: list[StageOutputs]) -> Table:
    t = Table(
        "Pretraining", ["method", "final train loss", "held-out loss", "k-NN top-1 (%)", "images/s", "wall time (s)"]
    )
    for mae in stage_metrics(stages, "pretrain_mae"):
        t.add(
            "MAE",
            mae.get("train_loss"),
            mae.get("val_masked_loss"),
            None,
            mae.get("images_per_s"),
            mae.get("wall_time_s"),
        )
    for ibot in stage_metrics(stages, "pretrain_ibot"):
        t.add("iBOT", ibot.get("loss"), None, ibot.get("knn_top1"), ibot.get("images_per_s"), ibot.get("wall_time_s"))
    return t


def finetune_table(stages: list[StageOutputs]) -> Table:
    t = Table(
        "Classification (held-out top-1 %, mean ± s.e. over seeds)",
        ["model", "seeds", "fine-tune top-1", "top-5", "linear probe top-1", "k-NN top-1", "wall time (s)"],
        note=(
            "The raw-pixel rows: a logistic regression and the same weighted k-NN on the flattened, normalised "
            "pixels of the same labeled split."
        ),
    )
    runs = stage_metrics(stages, "finetune")
    for init in layout.INITS:
        rows = [m for m in runs if m.get("init") == init]
        if rows:

            def col(k, rows=rows):
                return mean_pm([pick(m, k) for m in rows])

            t.add(
                init, len(rows), col("top1"), col("top5"), col("linear_probe_top1"), col("knn_top1"), col("wall_time_s")
            )
    for base in stage_metrics(stages, "baselines"):
        t.add(
            "raw pixels: logistic regression", "—", base.get("logistic_top1"), None, None, None, base.get("wall_time_s")
        )
        t.add("raw pixels: k-NN", "—", None, None, None, base.get("knn_top1"), None)
    return t


def detection_table(stages: list[StageOutputs]) -> Table:
    t = Table(
        "Detection (COCO mAP on held-out scenes, pycocotools; mean ± s.e. over seeds)",
        ["method", "labeled %", "seeds", "AP (teacher)", "AP50", "AP75", "AP (student)", "wall time (s)"],
    )
    runs = stage_metrics(stages, "detect")
    for pct in sorted({float(m["percent"]) for m in runs}):
        for method in layout.METHODS:
            rows = [m for m in runs if m.get("method") == method and float(m["percent"]) == pct]
            if rows:

                def col(k, rows=rows):
                    return mean_pm([pick(m, k) for m in rows], 3)

                t.add(
                    method,
                    f"{pct:g}",
                    len(rows),
                    col("teacher.AP"),
                    col("teacher.AP50"),
                    col("teacher.AP75"),
                    col("student.AP"),
                    col("wall_time_s"),
                )
    return t


def cka_table(stages: list[StageOutputs]) -> Table | None:
    found = stage_metrics(stages, "cka")
    if not found:
        return None
    m = found[0]
    kind = f"{'debiased' if m.get('debiased') else 'biased'}, {m.get('kernel', 'linear')} kernel"
    t = Table(
        f"CKA ({kind}, {m.get('images', '?')} held-out images)",
        ["pair", "layers", "mean CKA", "lowest layers", "top ViT layer vs best CNN layer"],
        note=(
            "What to compare with (Raghu et al. 2021, on ImageNet-scale models): a ViT's layers are more alike "
            "across depth "
            "than a ResNet's, the lowest layers of the two agree, and the top ViT layers match no ResNet layer well. "
            "'mean CKA': the mean over every layer pair; 'lowest layers': the first layer of each; "
            "'top ViT layer vs best CNN layer': the best CKA of the last ViT block with any CNN layer."
        ),
    )
    for name, pair in (m.get("pairs") or {}).items():
        summary = (m.get("summary") or {}).get(name, {})
        matrix = pair.get("cka") or []
        t.add(
            name.replace("__", " vs "),
            f"{len(matrix)}×{len(matrix[0]) if matrix else 0}",
            summary.get("mean"),
            summary.get("lowest_layers"),
            summary.get("top_vit_best_cnn"),
        )
    return t


def stage_times(stages: list[StageOutputs]) -> Table:
    t = Table("Wall time per stage", ["stage", "seconds"])
    total = 0.0
    for s in stages:
        for path in s.metrics:
            if path.is_file() and s.base != "report":
                seconds = read_metrics(path).get("wall_time_s")
                if seconds is not None:
                    t.add(s.name, seconds)
                    total += float(seconds)
    t.add("total (stages' own time, without start-up)", round(total, 2))
    return t


def collect_figures(
    stages: list[StageOutputs], first_seeds: dict[str, int], out: Path, root: Path
) -> list[tuple[str, Path]]:
    """Copy the current stages' PNG figures into ``out`` (seeded stages: the first seed's only),
    returning (caption, copied path)."""
    figures = []
    for s in stages:
        if s.base in first_seeds and not s.name.endswith(f"-{first_seeds[s.base]}"):
            continue
        for png in s.figures:
            if not png.is_file():
                raise FileNotFoundError(f"{png}: figure of stage {s.name} not found (run the stage)")
            rel = png.relative_to(root / layout.PLOTS) if png.is_relative_to(root / layout.PLOTS) else Path(png.name)
            dest = out / "__".join(rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, dest)
            figures.append((str(rel.with_suffix("")), dest))
    return figures


GRID_CELL_PX = 560  # a figure's width in the page's grid (PAGE's CSS)


def png_width(path: Path) -> int:
    """A PNG's width in pixels, from its IHDR chunk (0 when the file is not a PNG)."""
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def figure_tag(caption: str, path: Path, out: Path) -> str:
    """One figure of the page: in the grid, or, when it is over twice a grid cell wide (the CKA summary's
    grid of heatmaps), in a row of its own at the page's width, so that its labels stay readable."""
    attrs = " class='full'" if png_width(path) > 2 * GRID_CELL_PX else ""
    return (
        f"<figure{attrs}>"
        f"<img src='{html.escape(str(path.relative_to(out)))}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .7rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: .5rem; vertical-align: top; max-width: 560px; }}
figure.wide {{ display: block; max-width: 820px; }}
figure.full {{ display: block; max-width: 100%; }}
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


def judge_claims(stages: list[StageOutputs]) -> list[dict]:
    """Every claim the current stages' metrics can judge; one whose side has no runs (a stage not in the
    DAG, the probe or k-NN turned off) is left out with a warning."""
    baselines = stage_metrics(stages, "baselines")
    judged = []
    for claim in build_claims(
        stage_metrics(stages, "finetune"), stage_metrics(stages, "detect"), baselines[0] if baselines else None
    ):
        if claim.a.values and claim.b.values:
            judged.append(claim.judge())
        else:
            log.warning(
                "claim %s left out: no runs of %s", claim.id, claim.a.label if not claim.a.values else claim.b.label
            )
    return judged


def report(ctx: StageContext) -> dict:
    """Write the claims, reports/summary.md and reports/index.html from the current stages' metrics and figures."""
    out = ctx.root / layout.REPORTS
    stages = current_stages(ctx.root)
    judged = judge_claims(stages)
    write_json(out / "claims.json", {"level": 0.95, "claims": judged})
    write_json(ctx.root / layout.metrics_file("claims"), claims_metrics(judged))
    claims = claims_table(judged)
    write_text(out / "claims.md", claims.markdown(heading=False))
    tables = [claims, pretraining_table(stages), finetune_table(stages), detection_table(stages)]
    tables += [t for t in (cka_table(stages),) if t is not None] + [stage_times(stages)]
    title = ctx.section.title
    figures_dir = out / "figures"
    if figures_dir.exists():
        shutil.rmtree(figures_dir)
    claims_png = figures_dir / "claims.png"
    claims_figure(judged, claims_png, ctx)
    summary = (
        f"# {title}\n\n"
        + tables[0].markdown()
        + "\n![claims: per-seed differences](figures/claims.png)\n\n"
        + "\n".join(t.markdown() for t in tables[1:])
    )
    firsts = {"finetune": ctx.params.finetune.seeds[0], "detect": ctx.params.detect.seeds[0]}
    figures = collect_figures(stages, firsts, figures_dir, ctx.root)
    figure_html = "\n".join(figure_tag(c, p, out) for c, p in figures)
    claims_html = (
        tables[0].html() + "<figure class='wide'><img src='figures/claims.png' alt='claims: per-seed differences'>"
        "<figcaption>Per claim: each seed's difference A − B (dots), the mean (tick) and its 95 % interval (bar); "
        "dashed: 0."
        "</figcaption></figure>"
    )
    page = PAGE.format(
        title=html.escape(title),
        tables=claims_html + "\n" + "\n".join(t.html() for t in tables[1:]),
        figures=figure_html,
    )
    write_text(out / "summary.md", summary)
    write_text(out / "index.html", page)
    if ctx.is_main:
        ctx.tracker.log_artifact(out, "report")
    verdicts = {
        v: sum(c["verdict"] == v for c in judged) for v in ("holds", "inside noise", "reversed", "too few seeds")
    }
    log.info(
        "report: %s (%d claims: %s; %d tables, %d figures)",
        out / "index.html",
        len(judged),
        verdicts,
        len(tables),
        len(figures) + 1,
    )
    return {
        "tables": len(tables),
        "figures": len(figures) + 1,
        "claims": len(judged),
        **{f"claims_{k.replace(' ', '_')}": v for k, v in verdicts.items()},
    }


def fill_readme(readme: Path, claims_json: Path, check: bool = False) -> bool:
    """Write the claims table of ``claims_json`` (the committed ``metrics/claims.json``) between the README's
    claims markers; True when the README changed (with ``check``: would change, and it is left as it is).
    A README without both markers is an error naming them."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} markers to fill")
    if not claims_json.is_file():
        raise FileNotFoundError(f"{claims_json}: not found (run the report stage: dvc repro report)")
    try:
        block = f"{README_BEGIN}\n{readme_block(json.loads(claims_json.read_text(encoding='utf-8')))}\n{README_END}"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{claims_json}: not a claims file of the report stage ({type(e).__name__}: {e})") from None
    new = pattern.sub(lambda _: block, text, count=1)
    if new != text and not check:
        write_text(readme, new)
    return new != text


def readme_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.report --readme",
        description="Write the claims table of metrics/claims.json between the README's claims markers.",
    )
    parser.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), required=True)
    parser.add_argument("--claims", type=Path, default=Path("metrics/claims.json"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the README is out of date")
    args = parser.parse_args(argv)
    try:
        changed = fill_readme(args.readme, args.claims, check=args.check)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: report --readme: {e}", file=sys.stderr)
        return 1
    if args.check and changed:
        print(
            f"error: {args.readme}: the claims table differs from {args.claims} (run: python -m pipelines.report "
            "--readme)",
            file=sys.stderr,
        )
        return 1
    print(f"{args.readme}: {'claims table updated' if changed else 'claims table already current'}")
    return 0


if __name__ == "__main__":
    if "--readme" in sys.argv[1:]:
        sys.exit(readme_main(sys.argv[1:]))
    run_stage("report", report)
