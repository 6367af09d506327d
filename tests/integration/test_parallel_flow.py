"""The DAG in parallel (issue 25): `python -m pipelines.flow --parallel N` runs each stage whose upstream stages
are done in its own git worktree, the worktrees meeting through a DVC remote's run-cache, and the project then
restores every stage from the run-cache without recomputing it. On a four-stage tiny DAG (seconds) and on the
micro params' prepare -> (pretrain_mae, baselines) with MLflow's SQLite store shared by the concurrent stages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import set_params
from tests.pipelines.conftest import BIN, make_project, project_env
from tests.pipelines.tiny_dag import make_tiny_project, ticks

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def use_env(monkeypatch, root: Path, ticks_file: Path | None = None) -> None:
    for key, value in project_env(root).items():
        if key in ("PATH", "PYTHONPATH", "MLFLOW_TRACKING_URI") or key.startswith(
            ("DO_NOT", "DVC_", "MLFLOW_DISABLE", "GIT_")
        ):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MIMFLOW_PARENT_RUN_ID", raising=False)
    if ticks_file is not None:
        monkeypatch.setenv("TICKS", str(ticks_file))


def lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def dvc_repro(root: Path, *targets: str) -> str:
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro", *targets], cwd=root, env=project_env(root), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_parallel_tiny_dag_equals_sequential_and_a_failed_stage_is_all_a_rerun_recomputes(
    harness, tmp_path, monkeypatch
):
    """b and c run at once in their own worktrees; the project's dvc.lock equals a sequential `dvc repro`'s and
    its final restore recomputes nothing. A stage failing on bad input fails the flow with its one-line error,
    the stage running beside it finishes and stays in the run-cache, and the rerun recomputes only the failed
    stage and what depends on it."""
    from pipelines.flow import mimflow_pipeline

    sequential = make_tiny_project(tmp_path / "sequential")
    dvc_repro(sequential)
    root = make_tiny_project(tmp_path / "parallel")
    use_env(monkeypatch, root, tmp_path / "ticks")
    monkeypatch.setenv("TINY_SLEEP", "2")
    result = mimflow_pipeline(root=str(root), parallel=2, retries=0)
    assert result["recomputed"] == []
    assert lock_stages(root) == lock_stages(sequential)
    assert (root / "d.txt").read_text() == (sequential / "d.txt").read_text() == "dbaca"
    spans = ticks(tmp_path / "ticks")
    assert spans["b"][0] < spans["c"][1] and spans["c"][0] < spans["b"][1], spans  # b and c overlapped
    assert not subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout.count(
        "mimflow-workspaces"
    )

    # c fails on bad input while b runs beside it
    (root / "step.py").write_text((root / "step.py").read_text() + "\n# changed: every stage is stale\n")
    (root / "c.cfg").write_text("bad\n")
    (tmp_path / "ticks").unlink()
    with pytest.raises(Exception, match=r"^stage c stopped on bad input: error: c: c.cfg = 'bad': must be 'ok'$"):
        mimflow_pipeline(root=str(root), parallel=2, retries=0)
    assert set(ticks(tmp_path / "ticks")) == {"a", "b", "c"}  # d never started

    (root / "c.cfg").write_text("ok\n")
    (tmp_path / "ticks").unlink()
    mimflow_pipeline(root=str(root), parallel=2, retries=0)
    assert set(ticks(tmp_path / "ticks")) == {"c", "d"}  # a and b came from the run-cache
    assert "Running stage" not in dvc_repro(root)


def test_parallel_tiny_dag_through_a_configured_remote(harness, tmp_path, monkeypatch):
    """With a DVC remote configured (a directory here; S3, MinIO or SSH for a lab), the project pushes its results
    there first, the workspaces pull from and push to it, and the project restores every stage from it."""
    from pipelines.flow import mimflow_pipeline

    root = make_tiny_project(tmp_path / "parallel")
    env = project_env(root)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "team", str(tmp_path / "remote")], cwd=root, env=env)
    subprocess.run(["git", "commit", "-qam", "the team's remote"], cwd=root, env=env, check=True)
    dvc_repro(root, "a")  # done before the flow: the workspaces must get it from the remote
    use_env(monkeypatch, root, tmp_path / "ticks")
    result = mimflow_pipeline(root=str(root), parallel=2, retries=0)
    assert result["recomputed"] == []
    assert set(ticks(tmp_path / "ticks")) == {"b", "c", "d"}
    assert (root / "d.txt").read_text() == "dbaca"
    assert list((tmp_path / "remote" / "runs").rglob("*")), "no run-cache in the remote"
    assert "Running stage" not in dvc_repro(root)


def assert_run_cacheable(root: Path) -> None:
    """dvc.yaml as DVC's run-cache needs it: no ``persist`` output and no ``cache: false`` output that is not a
    metric or a plot (checkpoints/ is no DVC out; figures and runs/<stage>.json are plots)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        for out in stage.get("outs", []):
            opts = {} if isinstance(out, str) else next(iter(out.values())) or {}
            assert not opts.get("persist") and opts.get("cache", True), (name, out)


TIMING = re.compile(r"(_s|per_s|time_s)$")


def results(root: Path, stage: str) -> dict:
    data = json.loads((root / "metrics" / f"{stage}.json").read_text())
    return {k: v for k, v in data.items() if not TIMING.search(k)}


def test_parallel_micro_stages_share_sqlite_mlflow_and_equal_sequential(harness, tmp_path, monkeypatch):
    """prepare, then pretrain_mae and baselines at once, each in its worktree, logging to one SQLite MLflow store:
    no "database is locked", three FINISHED runs under the flow's run; dvc.lock's output hashes of the models,
    data and figures, and the results (runs/<stage>.json holds wall times, so it is not compared), equal a
    sequential `dvc repro` on the same machine; the final restore recomputes nothing."""
    import mlflow

    from pipelines.flow import mimflow_pipeline

    stages = ["prepare", "pretrain_mae", "baselines"]
    sequential = make_project(tmp_path / "sequential")
    set_params(sequential, tracking={"enabled": False})  # not a param of these stages: dvc.lock is unchanged
    root = make_project(tmp_path / "parallel")
    assert_run_cacheable(root)
    use_env(monkeypatch, root)
    started = time.perf_counter()
    out = mimflow_pipeline(stages=stages, root=str(root), parallel=2, retries=0)
    parallel_s = time.perf_counter() - started
    assert out["recomputed"] == []
    started = time.perf_counter()
    dvc_repro(sequential, *stages)
    print(f"wall time: parallel flow (N = 2) {parallel_s:.1f} s, dvc repro {time.perf_counter() - started:.1f} s")

    par, seq = lock_stages(root), lock_stages(sequential)
    for stage in stages:
        assert par[stage]["deps"] == seq[stage]["deps"], stage
        hashes = [
            {o["path"]: o["md5"] for o in lock[stage]["outs"] if not o["path"].startswith(("metrics/", "runs/"))}
            for lock in (par, seq)
        ]
        assert hashes[0] == hashes[1], stage
        assert results(root, stage) == results(sequential, stage), stage
    assert "Running stage" not in dvc_repro(root, *stages)

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    parent = next(r for r in runs if r.info.run_name.startswith("flow · "))
    children = {
        r.info.run_name.split(" · ")[0]: r.info.status
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert children == dict.fromkeys(stages, "FINISHED")
    assert parent.info.status == "FINISHED" and parent.data.metrics["stages_ran"] == 3


def test_a_sqlite_store_takes_two_stages_logging_at_once(tmp_path):
    """Issue 25, item 3: two processes logging to one SQLite store at once, as two parallel stages do, once the
    flow has prepared it (WAL) and created the experiment; no "database is locked", both runs complete."""
    import sqlite3
    import subprocess
    import sys

    import mlflow

    from pipelines.tracking import Tracker, prepare_store
    from tests.pipelines.conftest import REPO, micro_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    cfg = micro_config().tracking.model_copy(update={"uri": uri})
    parent = Tracker(cfg, tmp_path)
    parent.start("flow", {})  # creates the experiment, as the flow's run does
    parent.end()
    con = sqlite3.connect(tmp_path / "mlflow.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    script = (
        "import sys; from pathlib import Path; from pipelines.tracking import Tracker; "
        "from tests.pipelines.conftest import micro_config; "
        f"cfg = micro_config().tracking.model_copy(update={{'uri': {uri!r}}}); "
        f"t = Tracker(cfg, Path({str(tmp_path)!r})); t.start(sys.argv[1], {{'i': sys.argv[1]}}); "
        "[t.log_metrics({'loss': 1.0 / (s + 1), 'lr': 0.1}, step=s) for s in range(40)]; t.end()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MIMFLOW_PARENT_RUN_ID")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        for name in ("stage_a", "stage_b")
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    done = {r.info.run_name.split(" · ")[0]: r.info.status for r in runs}
    assert done["stage_a"] == done["stage_b"] == "FINISHED"
    history = client.get_metric_history(
        next(r.info.run_id for r in runs if r.info.run_name.startswith("stage_a")), "loss"
    )
    assert len(history) == 40
