"""End to end: `dvc repro` of the whole DAG on the micro params, then the results page in headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.pipelines.conftest import BIN, dvc_repro, run


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def full_run(project):
    """The whole DAG, as `dvc repro` runs it."""
    dvc_repro(project)
    return project


def test_whole_dag_through_dvc_repro(full_run):
    status = run(full_run, str(BIN / "dvc"), "status").stdout
    assert "up to date" in status, status
    shown = json.loads(run(full_run, str(BIN / "dvc"), "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    names = {os.path.normpath(p) for p in files}
    for expected in ["metrics/prepare.json", "metrics/pretrain_mae.json", "metrics/pretrain_ibot.json", "metrics/finetune/mae.json", "metrics/cka.json", "metrics/report.json"]:
        assert expected in names, sorted(names)
    assert any(n.startswith("metrics/detect/") for n in names)
    summary = (full_run / "reports" / "summary.md").read_text()
    for section in ("Pretraining", "Classification", "Detection", "CKA", "Wall time"):
        assert f"## {section}" in summary


def test_results_page_loads_every_figure_and_holds_numbers(full_run):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    page = full_run / "reports" / "index.html"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={full_run / '.chromium'}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
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


def test_detection_rows_follow_the_labeled_percents_params_asks_for(tmp_path):
    """metrics/detect keeps the files of percents run earlier; the page shows the current ones only,
    and a current one that is missing is an error naming it."""
    from pipelines.report import detection_table, stage_times

    detect = tmp_path / "detect"
    detect.mkdir()
    for name, ap in (("supervised-10", 0.2), ("softteacher-10", 0.25), ("supervised-20", 0.3), ("softteacher-20", 0.35)):
        (detect / f"{name}.json").write_text(json.dumps({"teacher": {"AP": ap}, "wall_time_s": 1.0}))
    rows = detection_table(tmp_path, [20]).rows
    assert [(r[0], r[1]) for r in rows] == [("supervised", "20"), ("softteacher", "20")]
    assert [r[0] for r in stage_times(tmp_path, [20]).rows] == ["detect/softteacher-20", "detect/supervised-20"]
    with pytest.raises(FileNotFoundError, match="supervised-5.json"):
        detection_table(tmp_path, [5])
