"""The claims' pairing: by seed where the sides share seeds, Welch where they do not, a fixed baseline as one value."""

from __future__ import annotations

import pytest

from pipelines.claims import Claim, Side, build_claims, claims_metrics
from tests.pipelines.conftest import REPO


def test_pairing_welch_and_fixed_sides():
    paired = Claim(
        "x", "A > B", "top1", Side("A", {0: 3.0, 1: 5.0, 2: 4.0}), Side("B", {0: 1.0, 1: 2.0, 2: 3.0, 9: 100.0})
    ).judge()
    assert (
        paired["test"] == "paired t"
        and paired["seeds"] == [0, 1, 2]
        and paired["diff"] == pytest.approx(2.0)
        and paired["n"] == 3
        and paired["verdict"] == "inside noise"
    )
    welch = Claim("y", "A > B", "top1", Side("A", {0: 3.0, 1: 5.0}), Side("B", {2: 1.0, 3: 2.0})).judge()
    assert welch["test"] == "Welch t" and welch["diff"] == pytest.approx(2.5) and welch["seeds"] == []
    fixed = Claim("z", "A > px", "top1", Side("A", {0: 30.0, 1: 32.0}), Side("px", {-1: 20.0})).judge()
    assert (
        fixed["diff"] == pytest.approx(11.0)
        and fixed["n"] == 2
        and fixed["b"]["mean"] == 20.0
        and fixed["verdict"] == "inside noise"
    )
    one = Claim("w", "A > B", "top1", Side("A", {0: 3.0}), Side("B", {0: 1.0})).judge()
    assert one["verdict"] == "too few seeds" and one["ci_low"] is None
    assert claims_metrics([paired, one]) == {
        "x": {k: paired[k] for k in ("diff", "ci_low", "ci_high", "n")} | {"verdict": 0},
        "w": {"diff": 2.0, "ci_low": None, "ci_high": None, "n": 1, "verdict": 0},
    }


def test_build_claims_picks_the_best_model_and_every_percent():
    ft = [
        {"init": i, "seed": s, "top1": t + s, "linear_probe_top1": 1.0, "knn_top1": 1.0}
        for i, t in (("scratch", 10.0), ("mae", 20.0), ("ibot", 15.0), ("cnn", 25.0))
        for s in (0, 1)
    ]
    det = [
        {"method": m, "percent": p, "seed": s, "teacher": {"AP": 0.1}, "student": {"AP": 0.2}}
        for m in ("supervised", "softteacher")
        for p in (5.0, 10.0)
        for s in (0, 1)
    ]
    claims = {c.id: c for c in build_claims(ft, det, {"logistic_top1": 30.0})}
    assert "The best model (CNN)" in claims["best_model_vs_pixels"].statement
    assert claims["best_model_vs_pixels"].a.values == {0: 25.0, 1: 26.0}
    assert {k for k in claims if k.startswith("detect")} == {
        f"detect_softteacher_vs_supervised_{w}_ap_{p}" for w in ("teacher", "student") for p in (5, 10)
    }
    assert claims["detect_softteacher_vs_supervised_student_ap_5"].a.values == {0: 0.2, 1: 0.2}


@pytest.mark.parametrize("section", ["finetune", "detect"])
@pytest.mark.parametrize(
    "seeds, message",
    [
        ([], "must list at least one seed"),
        ([0, 1, 0], "must not repeat a seed"),
        ([0, 1.5], "Input should be a valid integer"),
        (["1"], "Input should be a valid integer"),
        ([-1], "seeds must be in 0..4294967295"),
        (2, "Input should be a valid list"),
    ],
)
def test_bad_seeds_lists_are_one_line_params_errors(section, seeds, message):
    import yaml

    from pipelines.config import ParamsError, validate_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section]["seeds"] = seeds
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"params.yaml: {section}.seeds") and message in line
