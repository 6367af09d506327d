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


# ---------------------------------------------------------------- the graph, DVC's verdicts, names, progress
def tiny_env(monkeypatch, root, tmp_path) -> None:
    """The tiny project's environment for an in-process flow run; $TICKS records each stage's start and end."""
    for key, value in project_env(root).items():
        if key in ("PATH", "PYTHONPATH") or key.startswith(("DO_NOT", "DVC_", "MLFLOW_DISABLE", "GIT_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("TICKS", str(tmp_path / "ticks"))
    monkeypatch.delenv("MIMFLOW_PARENT_RUN_ID", raising=False)


def flow_task_runs(state) -> dict:
    """{task run name: task run} of the flow run that ended in ``state``, read back through Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        name = client.read_flow_run(flow_run_id).name
    return {"__flow_run_name__": name, **{r.name: r for r in runs}}


def test_flow_graph_has_dvc_yaml_edges_and_up_to_date_stages_end_skipped(harness, tmp_path, monkeypatch):
    """Issue 30, item 5: Prefect's graph has dvc.yaml's edges (each task run's ``wait_for`` inputs are its
    upstream stages' task runs); a second run, where DVC says every stage didn't change, ends every task
    Completed named Skipped with the message "up to date" and publishes no new metrics artifact; flow runs
    are named after the commit and a digest of params.yaml."""
    import re

    from prefect.client.orchestration import get_client

    from pipelines.flow import mimflow_pipeline
    from tests.pipelines.tiny_dag import make_tiny_project, ticks

    root = make_tiny_project(tmp_path / "tiny")
    tiny_env(monkeypatch, root, tmp_path)
    first = flow_task_runs(mimflow_pipeline(root=str(root), retries=0, return_state=True))
    ids = {name: str(r.id) for name, r in first.items() if name != "__flow_run_name__"}
    waits = {
        name: sorted(k for k, v in ids.items() if v in {str(i.id) for i in r.task_inputs.get("wait_for", [])})
        for name, r in first.items()
        if name != "__flow_run_name__"
    }
    assert waits == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert all(first[s].state.name == "Completed" for s in "abcd")
    assert set(ticks(tmp_path / "ticks")) == set("abcd")
    assert re.fullmatch(r"[0-9a-f]{7}\+?-p[0-9a-f]{8}", first["__flow_run_name__"]), first["__flow_run_name__"]

    (tmp_path / "ticks").unlink()
    second = flow_task_runs(mimflow_pipeline(root=str(root), retries=0, return_state=True))
    for s in "abcd":
        assert second[s].state.type.value == "COMPLETED" and second[s].state.name == "Skipped", second[s].state
        assert second[s].state.message.startswith("up to date")
    assert not (tmp_path / "ticks").exists()  # DVC ran nothing
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["d-metrics"])))
    assert len(artifacts) == 1  # the first run's only
    assert "| length | 5 |" in artifacts[0].data


def test_flow_waits_for_the_nearest_selected_upstream_stages(tmp_path):
    """A selection skips stages in between: the edges go to the nearest selected ancestors."""
    from pipelines.flow import stage_graph, upstream_edges
    from tests.pipelines.tiny_dag import make_tiny_project

    graph = stage_graph(make_tiny_project(tmp_path / "tiny"))
    assert [n.upstream for n in graph.values()] == [(), ("a",), ("a",), ("b", "c")]
    assert upstream_edges(["a", "d"], graph) == {"a": (), "d": ("a",)}
    assert upstream_edges(["a", "b", "d"], graph) == {"a": (), "b": ("a",), "d": ("b",)}


def test_dvc_outcome_reads_dvc_s_own_words():
    from pipelines.flow import dvc_outcome

    assert dvc_outcome("b", ["Stage 'a' didn't change, skipping", "Running stage 'b':", "> python x"]) == "ran"
    assert dvc_outcome("b", ["Running stage 'a':", "Stage 'b' didn't change, skipping"]) == "up to date"
    assert dvc_outcome("b", ["Pulling data for stage: 'b'"]) == "up to date"
    assert dvc_outcome("b", ["Stage 'b' is cached - skipping run, checking out outputs"]) == "restored"


def test_progress_bars_become_one_line_every_interval():
    """tqdm's bars, a log row per refresh once piped, are thinned to one short line per interval plus the last."""
    from pipelines.flow import ProgressFilter

    now = [0.0]
    keep = ProgressFilter(every_s=30, clock=lambda: now[0])
    bar = "pretrain_mae:  {p}%|█████     | {n}/40 [00:01<00:01,  1.50it/s, loss=0.1]"
    shown = []
    for n in range(1, 41):
        now[0] = n * 2.0  # a refresh every 2 s
        shown.append(keep(bar.format(p=n * 100 // 40, n=n)))
    lines = [s for s in shown if s]
    assert len(lines) == 4, lines  # at 2 s, 32 s, 62 s, and the last (100 %)
    assert lines[0] == "progress: pretrain_mae 2% 1/40 [00:01<00:01,  1.50it/s, loss=0.1]"
    assert lines[-1].startswith("progress: pretrain_mae 100% 40/40")
    assert keep("INFO resumed pretrain_mae at step 3") == "INFO resumed pretrain_mae at step 3"


def test_dvcs_push_hint_is_not_repeated_in_every_stages_log(tmp_path):
    """DVC prints "Use `dvc push` ..." after every `dvc repro` that ran something; the stage's log leaves it out."""
    import logging

    from pipelines.flow import run_logged

    logged = []
    logger = logging.getLogger("test-flow-hints")
    logger.info = lambda msg, *args: logged.append(msg % args if args else msg)  # type: ignore[method-assign]
    script = "echo 'Running stage x'; echo 'Use `dvc push` to send your updates to remote storage.'; echo done"
    lines = run_logged(["sh", "-c", script], tmp_path, {}, "x", logger)
    assert lines == ["Running stage x", "done"] and not any("dvc push" in m for m in logged[1:]), logged


def test_claims_become_a_prefect_artifact_and_parent_run_metrics(harness, tmp_path):
    """Issue 20, item 3 (the flow's part): reports/claims.md as the Prefect artifact mimflow-claims; on the flow's
    MLflow run, claims.md as an artifact and each claim's numbers as metrics claim.<id>.<field>."""
    import json

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.flow import publish_claims
    from pipelines.tracking import Tracker
    from tests.pipelines.conftest import micro_config

    (tmp_path / "reports").mkdir()
    (tmp_path / "metrics").mkdir()
    table = "| claim | verdict |\n|---|---|\n| MAE > scratch | holds |\n"
    (tmp_path / "reports" / "claims.md").write_text(table)
    claims = {"finetune_mae_vs_scratch": {"diff": 11.25, "ci_low": 2.5, "ci_high": None, "n": 2, "verdict": 1}}
    (tmp_path / "metrics" / "claims.json").write_text(json.dumps(claims))
    cfg = micro_config().tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        tracker = Tracker(cfg, tmp_path)
        tracker.start("flow", {"flow": {"stages": "report"}})
        assert publish_claims(tmp_path, tracker)
        run_id = tracker.run_id
        tracker.end()
        run = mlflow.MlflowClient(cfg.uri).get_run(run_id)
        artifacts = [a.path for a in mlflow.MlflowClient(cfg.uri).list_artifacts(run_id)]
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert run.data.metrics["claim.finetune_mae_vs_scratch.diff"] == 11.25
    assert run.data.metrics["claim.finetune_mae_vs_scratch.verdict"] == 1
    assert "claim.finetune_mae_vs_scratch.ci_high" not in run.data.metrics  # null: no interval
    assert "claims.md" in artifacts
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mimflow-claims"])))
    assert found and found[0].data == table
    assert not publish_claims(tmp_path / "nothing", tracker)


def test_the_flow_graph_of_the_projects_dvc_yaml_has_its_edges():
    """On the project's own dvc.yaml and params.yaml (the matrix expanded), each stage waits for exactly the
    stages whose outputs it reads, less those it reaches through another (the transitive reduction): computed
    here from dvc.lock's deps and outs paths, independently of DVC's graph, which the flow uses."""
    import networkx as nx
    import yaml

    from pipelines.flow import stage_graph, upstream_edges
    from tests.pipelines.conftest import REPO

    graph = stage_graph(REPO)
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert set(graph) <= set(lock), "a stage of dvc.yaml has never run: dvc.lock has no deps and outs for it"
    lock = {s: lock[s] for s in graph}

    def under(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

    reads = nx.DiGraph()
    reads.add_nodes_from(lock)
    for stage, entry in lock.items():
        for other, produced in lock.items():
            outs = [o["path"] for o in produced.get("outs", [])]
            if other != stage and any(under(d["path"], o) for d in entry.get("deps", []) for o in outs):
                reads.add_edge(other, stage)
    expected = {s: tuple(sorted(nx.transitive_reduction(reads).predecessors(s))) for s in lock}

    assert upstream_edges(list(graph), graph) == {s: expected[s] for s in graph}
    assert expected["finetune@mae-0"] == ("pretrain_ibot", "pretrain_mae") and "cka" in expected["report"]
