"""The claims the pipeline exists to show, judged over seeds (used by the report stage).

Each claim compares two sides on one metric: "A > B". Runs of one seed are paired (finetune@mae-0 and
finetune@scratch-0 share the labeled split, data order and head init), so the difference gets a
paired t interval; sides without common seeds get Welch's; a side that is one fixed number (the
raw-pixel baseline, which no seed enters) is compared as a one-sample t interval of A - baseline.
The statistics are ``components.evaluation.stats``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from components.evaluation.stats import mean_se, paired_t_interval, welch_t_interval

VERDICT_CODE = {"holds": 1, "inside noise": 0, "reversed": -1, "too few seeds": 0}


@dataclass
class Side:
    label: str
    values: dict[int, float] = field(default_factory=dict)  # seed -> value; key -1: a fixed value no seed enters

    @property
    def fixed(self) -> bool:
        return list(self.values) == [-1]


@dataclass
class Claim:
    id: str
    statement: str
    metric: str
    a: Side
    b: Side

    def judge(self) -> dict:
        """n, each side's mean and s.e., the mean difference a - b with its 95 % interval, and the verdict."""
        if not self.a.values or not self.b.values:
            missing = self.a.label if not self.a.values else self.b.label
            raise ValueError(f"claim {self.id}: no runs of {missing!r} in the metrics")
        if self.b.fixed:
            seeds = sorted(self.a.values)
            a, b = [self.a.values[s] for s in seeds], [self.b.values[-1]] * len(seeds)
            ci, test = paired_t_interval(a, b), "one-sample t against a fixed value"
        else:
            seeds = sorted(set(self.a.values) & set(self.b.values))
            if seeds:
                a, b = [self.a.values[s] for s in seeds], [self.b.values[s] for s in seeds]
                ci, test = paired_t_interval(a, b), "paired t"
            else:
                a, b = list(self.a.values.values()), list(self.b.values.values())
                seeds = []
                ci, test = welch_t_interval(a, b), "Welch t"

        def side(s: Side, values: list[float]) -> dict:
            mean, se = mean_se(values)
            return {
                "label": s.label,
                "mean": mean,
                "se": se,
                "values": {str(k): v for k, v in sorted(s.values.items())},
            }

        return {
            "id": self.id,
            "claim": self.statement,
            "metric": self.metric,
            "n": ci.n,
            "seeds": seeds,
            "test": test,
            "a": side(self.a, a),
            "b": side(self.b, b if not self.b.fixed else [self.b.values[-1]]),
            "diff": ci.diff,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "df": ci.df,
            "level": ci.level,
            "verdict": ci.verdict,
        }


INIT_LABELS = {"scratch": "ViT from scratch", "mae": "ViT from MAE", "ibot": "ViT from iBOT", "cnn": "CNN"}


def build_claims(finetune: list[dict], detect: list[dict], baselines: dict | None) -> list[Claim]:
    """The claims from every seed's metrics: ``finetune`` and ``detect`` are the metrics files of the
    current finetune@ and detect@ stages (each with its ``seed``), ``baselines`` metrics/baselines.json."""

    def runs(rows: list[dict], key: str, **match) -> dict[int, float]:
        out = {}
        for m in rows:
            if all(m.get(k) == v for k, v in match.items()):
                node = m
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    out[int(m["seed"])] = float(node)
        return out

    def ft(init: str, key: str) -> Side:
        return Side(INIT_LABELS[init], runs(finetune, key, init=init))

    claims = [
        Claim(
            "finetune_mae_vs_scratch",
            "MAE pretraining beats training from scratch (fine-tune top-1 %)",
            "top1",
            ft("mae", "top1"),
            ft("scratch", "top1"),
        ),
        Claim(
            "finetune_ibot_vs_scratch",
            "iBOT pretraining beats training from scratch (fine-tune top-1 %)",
            "top1",
            ft("ibot", "top1"),
            ft("scratch", "top1"),
        ),
        Claim(
            "probe_mae_vs_scratch",
            "MAE's frozen encoder beats a random one (linear probe top-1 %)",
            "linear_probe_top1",
            ft("mae", "linear_probe_top1"),
            ft("scratch", "linear_probe_top1"),
        ),
        Claim(
            "probe_ibot_vs_scratch",
            "iBOT's frozen encoder beats a random one (linear probe top-1 %)",
            "linear_probe_top1",
            ft("ibot", "linear_probe_top1"),
            ft("scratch", "linear_probe_top1"),
        ),
        Claim(
            "knn_ibot_vs_random",
            "iBOT's teacher represents the images better than a random encoder (k-NN top-1 %, same split)",
            "knn_top1",
            ft("ibot", "knn_top1"),
            ft("scratch", "knn_top1"),
        ),
        Claim(
            "finetune_cnn_vs_scratch",
            "A CNN beats a ViT trained from scratch on few labels (fine-tune top-1 %)",
            "top1",
            ft("cnn", "top1"),
            ft("scratch", "top1"),
        ),
    ]
    for pct in sorted({float(m["percent"]) for m in detect}):
        for who in ("teacher", "student"):
            claims.append(
                Claim(
                    f"detect_softteacher_vs_supervised_{who}_ap_{pct:g}",
                    f"Soft Teacher beats the supervised baseline at {pct:g} % labels ({who} COCO AP)",
                    f"{who}.AP",
                    Side("Soft Teacher", runs(detect, f"{who}.AP", method="softteacher", percent=pct)),
                    Side("supervised", runs(detect, f"{who}.AP", method="supervised", percent=pct)),
                )
            )
    if baselines is not None:
        means = {
            init: sum(v) / len(v) for init in INIT_LABELS if (v := list(runs(finetune, "top1", init=init).values()))
        }
        if means:
            best = max(means, key=means.get)
            claims.append(
                Claim(
                    "best_model_vs_pixels",
                    f"The best model ({INIT_LABELS[best]}) beats logistic regression on raw pixels (top-1 %)",
                    "top1",
                    ft(best, "top1"),
                    Side("raw pixels, logistic regression", {-1: float(baselines["logistic_top1"])}),
                )
            )
    return claims


def claims_metrics(judged: list[dict]) -> dict:
    """metrics/claims.json for `dvc metrics show`: per claim, numbers only
    (verdict 1 holds, 0 inside noise or too few seeds, -1 reversed)."""
    return {
        c["id"]: {
            "diff": c["diff"],
            "ci_low": c["ci_low"],
            "ci_high": c["ci_high"],
            "n": c["n"],
            "verdict": VERDICT_CODE[c["verdict"]],
        }
        for c in judged
    }


# ---------------------------------------------------------------- the README's claims block

README_NAMES = {"scratch": "scratch", "mae": "MAE", "ibot": "iBOT", "cnn": "CNN", "random": "random init"}
README_METRICS = {"finetune": "fine-tune top-1", "probe": "linear probe", "knn": "k-NN"}


def readme_claim_name(claim_id: str) -> str:
    """A short name for a claim of :func:`build_claims`, from its id (an id it does not know: the id itself)."""
    if m := re.fullmatch(r"(finetune|probe|knn)_([a-z]+)_vs_([a-z]+)", claim_id):
        kind, a, b = m.groups()
        b = "random" if kind != "finetune" and b == "scratch" else b  # frozen, the scratch ViT is its random init
        return f"{README_METRICS[kind]}: {README_NAMES.get(a, a)} > {README_NAMES.get(b, b)}"
    if m := re.fullmatch(r"detect_softteacher_vs_supervised_(teacher|student)_ap_([0-9.]+)", claim_id):
        return f"{m.group(1)} AP, {m.group(2)} % labels: Soft Teacher > supervised"
    if claim_id == "best_model_vs_pixels":
        return "top-1: best model > raw-pixel logistic regression"
    return f"`{claim_id}`"


def readme_verdict(entry: dict) -> str:
    """The verdict word of a metrics/claims.json entry (its code 0 is 'inside noise' or, without an interval,
    'too few seeds')."""
    if entry["ci_low"] is None:
        return "too few seeds"
    return {1: "**holds**", 0: "inside noise", -1: "reversed"}[entry["verdict"]]


def readme_block(metrics_claims: dict) -> str:
    """The README's claims table: every entry of the committed ``metrics/claims.json``, in its order."""

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:+.3g}"

    rows = [
        f"| {readme_claim_name(cid)} | {readme_verdict(e)} | {num(e['diff'])} | "
        + ("—" if e["ci_low"] is None else f"[{num(e['ci_low'])}, {num(e['ci_high'])}]")
        + f" | {e['n']} |"
        for cid, e in metrics_claims.items()
    ]
    return "\n".join(
        [
            "The default run's claims over its seeds (`metrics/claims.json`; `python -m pipelines.report --readme` "
            "writes this table):",
            "",
            "| claim (A > B) | verdict | A − B | 95 % CI | n |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
