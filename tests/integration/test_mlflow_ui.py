"""The MLflow UI as a user sees it (issue 28, item 2), in headless Chromium: a store with one run logged by the
project's Tracker, served by `mlflow server`. MLflow 3's UI chooses between its GenAI pages (a traces overview)
and its model-training pages (the runs table) by its own switch (the URL's ``workflowType``, then the browser's
last choice, GenAI by default); the experiment's kind tag alone does not pick it. The link the project gives,
``#/experiments/<id>?workflowType=machine_learning``, opens on the runs table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.integration.conftest import free_port
from tests.pipelines.conftest import BIN, REPO, project_env

pytestmark = pytest.mark.integration

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


def runs_page(port: int, experiment_id: str) -> str:
    """The link to an experiment's runs table in MLflow 3's UI."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning"


def browse(browser: str, url: str, profile, *mode: str) -> subprocess.CompletedProcess:
    """Open ``url`` in headless Chromium (``mode``: --dump-dom for the rendered DOM, --screenshot=FILE)."""
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1280,800",
            "--virtual-time-budget=20000",
            *mode,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.timeout(600)
def test_the_experiment_opens_on_the_runs_table(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
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
        api = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
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

        url = runs_page(port, experiment["experiment_id"])
        dom = browse(browser, url, tmp_path / "chromium", "--dump-dom").stdout
        assert "Run Name" in dom and "<strong>1</strong> matching run" in dom, dom[-2000:]  # the runs table
        assert re.search(r"href=\"#/experiments/\d+/runs/\w+\"><span[^>]*>pretrain_mae", dom)  # its one run
        assert "Detect Issues" not in dom and "No data available" not in dom  # not the GenAI traces overview
    finally:
        server.terminate()
        server.wait(timeout=30)
