"""The Prefect flow drives the DVC stages in dvc.yaml's order and nests their MLflow runs."""

from __future__ import annotations

import os

import pytest

from tests.pipelines.conftest import dvc_repro, project_env


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_stage_order_comes_from_dvc_yaml(project):
    from pipelines.flow import stage_order

    order = stage_order(project)
    assert order[0] == "prepare"
    import yaml

    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert {s.split("@")[0] for s in order} == set(declared)
    if "report" in declared:
        assert order[-1] == "report"


def test_flow_runs_stages_and_nests_their_mlflow_runs(project, harness, monkeypatch):
    import mlflow

    from pipelines.flow import mimflow_pipeline

    dvc_repro(project, "prepare")
    for key, value in project_env(project).items():
        if key in ("MLFLOW_TRACKING_URI", "PYTHONPATH") or key.startswith(("DO_NOT", "DVC_", "MLFLOW_DISABLE")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # no venv activated: the flow finds its own python
    monkeypatch.chdir(project)
    result = mimflow_pipeline(stages=["prepare"], force=True, retries=0, root=str(project))
    assert "prepare" in result and any("prepare.json" in k for k in result["prepare"])

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mimflow"], output_format="list")
    parents = [r for r in runs if r.info.run_name.startswith("flow · ")]
    assert parents, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert [r.info.run_name.split(" · ")[0] for r in children] == ["prepare"]
    assert parents[0].data.metrics["stages_finished"] == 1 and parents[0].data.metrics["stages_done"] == 1
    child = children[0]
    assert child.data.tags["stage"] == "prepare" and "mlflow.source.git.commit" in child.data.tags
    assert child.data.metrics["classification.train"] == 96
    assert "prepare.classification.image_size" in child.data.params


def test_flow_rejects_unknown_stages(project, harness):
    from pipelines.flow import mimflow_pipeline

    with pytest.raises(ValueError, match="unknown stage"):
        mimflow_pipeline(stages=["no_such_stage"], root=str(project))


def test_a_stage_stopped_by_bad_input_is_not_retried():
    from prefect.states import Failed

    from pipelines.flow import StageInputError, retry_unless_bad_input

    assert not retry_unless_bad_input(
        None, None, Failed(data=StageInputError("stage prepare stopped on bad input: error: ..."))
    )
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("stage prepare failed (exit 137)")))


@pytest.mark.parametrize("case", ["bad params", "unknown stage"])
def test_the_flow_command_says_what_is_wrong_in_one_line(project, case, tmp_path):
    """Bad params or an unknown stage stop `python -m pipelines.flow` before any flow run starts."""
    import shutil
    import subprocess
    import sys

    import yaml

    root = tmp_path / "p"
    shutil.copytree(
        project,
        root,
        ignore=shutil.ignore_patterns("data", "models", "checkpoints", "mlflow.db", ".prefect", "cache", "mlruns"),
    )
    args = ["prepare"]
    if case == "bad params":
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["prepare"]["contact_sheet_samples"] = 0
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    else:
        args = ["no_such_stage"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.flow", *args],
        cwd=root,
        env=project_env(root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == (2 if case == "bad params" else 1), proc.stderr
    assert "Traceback" not in proc.stderr and last.startswith("error: flow: "), proc.stderr
    assert ("prepare.contact_sheet_samples = 0" if case == "bad params" else "unknown stage(s) no_such_stage") in last
