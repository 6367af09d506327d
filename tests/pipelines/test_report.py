"""End to end: `dvc repro` of the whole DAG on the micro params, then the results page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.results import read_results
from tests.pipelines.conftest import BIN, dvc_repro, make_project, micro_params, run


def headless_chromium(profile: Path, budget_ms: int) -> list[str]:
    """Headless Chromium's command line up to its action (``--dump-dom URL``, ``--screenshot=FILE URL``), with its
    profile in ``profile`` and ``budget_ms`` of virtual time for the page's scripts; skips the test where Chromium
    is not installed (fails under CI, where make test installs it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    return [
        *[browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync"],
        *["--disable-background-networking", "--disable-component-update", "--window-size=1280,800"],
        *[f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"],
    ]


def _leaves(d):
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


def _keys(d):
    for k, v in d.items():
        yield k
        if isinstance(v, dict):
            yield from _keys(v)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The whole DAG on the micro params, as `dvc repro` runs it, without MLflow: each stage's run is checked by
    its stage test and the team-server test; with it, this file took 222 s instead of 114 s on 2 cores."""
    params = micro_params()
    params["tracking"]["enabled"] = False
    path = tmp_path_factory.mktemp("full") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    project = make_project(path.parent / "project", params=path)
    dvc_repro(project)
    return project


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_whole_dag_through_dvc_repro(full_run):
    status = run(full_run, str(BIN / "dvc"), "status").stdout
    assert "up to date" in status, status
    shown = json.loads(run(full_run, str(BIN / "dvc"), "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    names = {os.path.normpath(p) for p in files}
    for expected in [
        "metrics/prepare.json",
        "metrics/pretrain_mae.json",
        "metrics/pretrain_ibot.json",
        "metrics/finetune/mae-0.json",
        "metrics/finetune/mae-1.json",
        "metrics/baselines.json",
        "metrics/cka.json",
        "metrics/report.json",
        "metrics/claims.json",
    ]:
        assert expected in names, sorted(names)
    assert any(n.startswith("metrics/detect/") for n in names)
    # numbers only (issue 30): timings, strings and flags are each stage's runs/<stage>.json, no DVC metric
    leaves = [v for f in files.values() for v in _leaves(f["data"])]
    assert leaves and all(v is None or type(v) in (int, float) for v in leaves), [
        v for v in leaves if v is not None and type(v) not in (int, float)
    ][:10]
    assert not any(k.endswith("_s") for f in files.values() for k in _keys(f["data"]))
    assert (full_run / "runs" / "finetune" / "mae-0.json").is_file() and (full_run / "runs" / "cka.json").is_file()
    summary = (full_run / "reports" / "summary.md").read_text()
    for section in ("Claims", "Pretraining", "Classification", "Detection", "CKA", "Wall time"):
        assert f"## {section}" in summary


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_results_page_loads_every_figure_and_holds_numbers(full_run):
    page = full_run / "reports" / "index.html"
    command = headless_chromium(full_run / ".chromium", 10000)
    proc = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<table" in dom, proc.stderr[-2000:]
    loaded = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load check did not run"
    ok, total = map(int, loaded.groups())
    assert total >= 8 and ok == total, f"{ok} of {total} figures loaded"
    tables = re.findall(r"<table>(.*?)</table>", dom, flags=re.S)
    assert len(tables) >= 5
    for table in tables:
        cells = re.findall(r"<td>([^<]*)</td>", table)
        assert any(re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", c) for c in cells), table[:300]


CLAIMS = {
    "finetune_mae_vs_scratch",
    "finetune_ibot_vs_scratch",
    "probe_mae_vs_scratch",
    "probe_ibot_vs_scratch",
    "knn_ibot_vs_random",
    "finetune_cnn_vs_scratch",
    "best_model_vs_pixels",
}


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_claims_over_two_seeds_and_the_baselines_on_the_models_split(full_run):
    """Every claim is judged on the micro params' two seeds; the raw-pixel baselines used the models' split."""
    params = yaml.safe_load((full_run / "params.yaml").read_text())
    claims = json.loads((full_run / "reports" / "claims.json").read_text())["claims"]
    percents = params["prepare"]["detection"]["labeled_percents"]
    detect = {f"detect_softteacher_vs_supervised_{who}_ap_{p:g}" for p in percents for who in ("teacher", "student")}
    assert {c["id"] for c in claims} == CLAIMS | detect
    for c in claims:
        assert c["n"] == 2 and c["verdict"] in ("holds", "inside noise", "reversed"), c
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and c["test"] in (
            "paired t",
            "one-sample t against a fixed value",
        )
        a, b = c["a"]["values"], c["b"]["values"]
        if c["test"] == "paired t":
            assert c["seeds"] == [0, 1] and c["diff"] == pytest.approx(sum(a[s] - b[s] for s in ("0", "1")) / 2)
    shown = json.loads(run(full_run, str(BIN / "dvc"), "metrics", "show", "--json").stdout)
    numbers = next(iter(shown.values()))["data"]["metrics/claims.json"]["data"]
    assert set(numbers) == {c["id"] for c in claims} and all(
        set(v) == {"diff", "ci_low", "ci_high", "n", "verdict"} for v in numbers.values()
    )
    summary = (full_run / "reports" / "summary.md").read_text()
    assert summary.index("## Claims") < summary.index("## Pretraining") and "figures/claims.png" in summary
    assert (full_run / "reports" / "claims.md").read_text().count("\n| ") == len(claims) + 1
    # the baselines: the labeled split and held-out set of every fine-tuned model
    base = read_results(full_run / "metrics" / "baselines.json")
    for seed in params["finetune"]["seeds"]:
        for init in ("scratch", "mae", "ibot", "cnn"):
            m = read_results(full_run / "metrics" / "finetune" / f"{init}-{seed}.json")
            assert (m["split"], m["split_digest"], m["labeled_images"], m["val_images"]) == (
                base["split"],
                base["split_digest"],
                base["labeled_images"],
                base["val_images"],
            )
    assert 0 <= base["logistic_top1"] <= 100 and base["logistic_converged"] and base["features"] == 3 * 32 * 32
    assert "raw pixels: logistic regression" in summary


def fake_outputs(root, stages):
    """Metrics and PNGs for every current stage, as the stages would write them (the report reads nothing else)."""
    from PIL import Image

    for s in stages:
        for path in s.metrics:
            base, _, variant = s.name.partition("@")
            m = {"wall_time_s": 1.0}
            if base == "finetune":
                init, seed = variant.rsplit("-", 1)
                m.update(
                    init=init,
                    seed=int(seed),
                    top1=20.0 + int(seed) + (init == "mae"),
                    top5=60.0,
                    knn_top1=15.0,
                    linear_probe_top1=18.0,
                )
            elif base == "detect":
                method, pct, seed = variant.split("-")
                ap = 0.2 + 0.01 * int(seed) + 0.05 * (method == "softteacher")
                m.update(method=method, percent=float(pct), seed=int(seed), teacher={"AP": ap}, student={"AP": ap})
            elif base == "baselines":
                m.update(logistic_top1=19.0, knn_top1=17.0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(m))
        names = [str(f.relative_to(root)) for f in s.figures]
        if s.name in ("prepare", "cka"):
            names = [f"plots/{s.name}/a.png"]
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(root / name)


def test_the_page_shows_this_runs_stages_only(tmp_path, monkeypatch):
    """Issue 28: the page lists what the current dvc.yaml and params define. With the outputs of a run at
    10 % detection labels still in the workspace, a run at 20 % shows only the 20 % figures and rows."""
    from pipelines.common import main
    from pipelines.report import current_stages, report

    params = micro_params()
    params["tracking"]["enabled"] = False
    params["prepare"]["detection"]["labeled_percents"] = [10]
    root = make_project(tmp_path / "p")
    monkeypatch.chdir(root)
    pages = {}
    for pct in (10, 20):
        params["prepare"]["detection"]["labeled_percents"] = [pct]
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        stages = current_stages(root)
        assert sum(s.name.startswith("detect@") for s in stages) == 2 * 2  # two methods, two seeds
        fake_outputs(root, stages)
        assert main("report", report, root / "params.yaml") == 0
        pages[pct] = (root / "reports" / "index.html").read_text()
    assert "detect__supervised-10-0__predictions.png" in pages[10]
    assert (
        root / "plots" / "detect" / "supervised-10-0" / "predictions.png"
    ).is_file()  # the stale figure is still there ...
    assert (
        "-10-" not in pages[20] and "detect__softteacher-20-0__predictions.png" in pages[20]
    )  # ... and not on the page
    assert not list((root / "reports" / "figures").glob("*-10-*"))
    claims = json.loads((root / "reports" / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims if c["id"].startswith("detect")] == [
        f"detect_softteacher_vs_supervised_{w}_ap_20" for w in ("teacher", "student")
    ]
    soft = next(c for c in claims if c["id"].endswith("teacher_ap_20"))
    assert soft["diff"] == pytest.approx(0.05) and soft["verdict"] == "holds"  # the same +0.05 on both seeds


def test_readme_claims_block_is_filled_from_metrics_claims_json(tmp_path):
    from pipelines.report import fill_readme

    readme, claims = tmp_path / "README.md", tmp_path / "claims.json"
    claims.write_text(
        json.dumps({"finetune_mae_vs_scratch": {"diff": 2.5, "ci_low": 0.5, "ci_high": 4.5, "n": 3, "verdict": 1}})
    )
    readme.write_text("# x\n\n<!-- claims:begin -->\nold\n<!-- claims:end -->\n\nmore\n")
    assert fill_readme(readme, claims, check=True) is True and "old" in readme.read_text()
    assert fill_readme(readme, claims) is True
    text = readme.read_text()
    assert "| fine-tune top-1: MAE > scratch | **holds** | +2.5 | [+0.5, +4.5] | 3 |\n<!-- claims:end -->" in text
    assert text.startswith("# x\n\n<!-- claims:begin -->\n") and text.endswith("<!-- claims:end -->\n\nmore\n")
    assert fill_readme(readme, claims) is False
    (tmp_path / "bare.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="claims:begin"):
        fill_readme(tmp_path / "bare.md", claims)


def test_a_figure_over_twice_a_grid_cell_wide_gets_a_row_of_its_own(tmp_path):
    """Issue 28, item 5: the CKA summary (a 4 x 4 grid of heatmaps) is shown at the page's width, the
    heatmaps beside each other in the grid."""
    from PIL import Image

    from pipelines.report import GRID_CELL_PX, figure_tag, png_width

    summary, pair = tmp_path / "cka__summary.png", tmp_path / "cka__mae__ibot.png"
    Image.new("RGB", (1848, 1632)).save(summary)
    Image.new("RGB", (677, 533)).save(pair)
    assert png_width(summary) == 1848 and png_width(pair) == 677 > GRID_CELL_PX
    assert figure_tag("cka/summary", summary, tmp_path).startswith("<figure class='full'><img src='cka__summary.png'")
    assert figure_tag("cka/mae__ibot", pair, tmp_path).startswith("<figure><img src='cka__mae__ibot.png'")
    (tmp_path / "x.png").write_bytes(b"not a png")
    assert png_width(tmp_path / "x.png") == 0


LOG_ONE_RUN = """
from pathlib import Path
from pipelines.tracking import Tracker
from tests.pipelines.conftest import micro_config
params = micro_config()
tracker = Tracker(params.tracking, Path.cwd())
tracker.start("pretrain_mae", {"pretrain_mae": params.pretrain_mae.model_dump(mode="json")})
for step in range(1, 5):
    tracker.log_metrics({"loss": 1.0 / step}, step=step)
tracker.log_results({"train_loss": 0.25, "val_masked_loss": 0.3})
tracker.end("FINISHED")
"""


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_mlflow_ui_opens_the_experiment_on_its_runs_table(tmp_path):
    """Issue 28, item 2, as a user sees it: a stage's run, logged by the project's Tracker into a SQLite store,
    behind `mlflow server`, in headless Chromium. MLflow 3's UI chooses between its GenAI pages (a traces
    overview) and its model-training pages (the runs table) by its own switch: the URL's ``workflowType``, then
    the browser's last choice, GenAI by default; the experiment's kind tag alone does not pick it.
    ``#/experiments/<id>?workflowType=machine_learning`` does."""
    import time
    import urllib.request

    from tests.integration.conftest import free_port
    from tests.pipelines.conftest import REPO, project_env

    headless = headless_chromium(tmp_path / "chromium", 20000)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**project_env(tmp_path), "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}
    subprocess.run([str(BIN / "python"), "-c", LOG_ONE_RUN], cwd=tmp_path, env=env, check=True, timeout=300)
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1", "--default-artifact-root", str(tmp_path / "mlruns")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        api, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not answer on port {port} (exit {server.poll()})")
                time.sleep(1)
        with urllib.request.urlopen(f"{api}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mimflow") as r:
            experiment = json.loads(r.read())["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development"
        url = f"{api}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
        proc = subprocess.run([*headless, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        dom = proc.stdout
        assert "Run Name" in dom and "<strong>1</strong> matching run" in dom, dom[-2000:]  # the runs table
        assert re.search(r"href=\"#/experiments/\d+/runs/\w+\"><span[^>]*>pretrain_mae", dom)  # its one run
        assert "Detect Issues" not in dom and "No data available" not in dom  # not the GenAI traces overview

        # and what a user sees there: a screenshot of the page (docs/img/mlflow-runs.png is one), drawn, not blank
        shot = tmp_path / "mlflow-runs.png"
        subprocess.run([*headless, f"--screenshot={shot}", url], capture_output=True, timeout=180)
        from PIL import Image

        with Image.open(shot) as img:
            assert img.size == (1280, 800), img.size
            colours = img.convert("RGB").getcolors(maxcolors=1 << 16) or []
        assert len(colours) > 50 and max(n for n, _ in colours) < 0.9 * 1280 * 800, f"a blank page: {shot}"
    finally:
        server.terminate()
        server.wait(timeout=30)
