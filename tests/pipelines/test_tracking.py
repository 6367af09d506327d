"""MLflow as its users expect (issues 28 and 30): a training experiment, runs named by stage and commit,
killed runs closed, constants as params, one step axis, figures as images, upstream params, the alias
moved only on a strict improvement on the same data and params, and no empty flow parent. In process,
on a temporary SQLite store, read back through the MLflow client and through the REST API (the tracking
server's Flask app, in process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipelines.tracking import EXPERIMENT_KIND, Tracker, upstream_params
from tests.pipelines.conftest import micro_config, mlflow_rest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A git repository with one commit (the run names' short commit) and a SQLite store in it."""
    import mlflow

    root = tmp_path_factory.mktemp("tracking")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("DVC_EXP_NAME", raising=False)
    patch.delenv("MIMFLOW_PARENT_RUN_ID", raising=False)
    yield root, uri, commit
    patch.undo()
    mlflow.set_tracking_uri(None)


def tracker(root, experiment: str = "mimflow") -> Tracker:
    cfg = micro_config().tracking.model_copy(update={"experiment": experiment})
    return Tracker(cfg, root)


@pytest.fixture()
def rest(store):
    """The tracking server's REST API on the store (Flask test client: no server process)."""
    with mlflow_rest(store[1]) as client:
        yield client


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_left_running_by_a_dead_process_ends_killed_when_the_stage_starts_again(store):
    import socket

    import mlflow

    root, uri, _ = store
    client = mlflow.MlflowClient(uri)
    first = tracker(root)
    first.start("pretrain_mae", {"pretrain_mae": {"epochs": 1}})
    first.end()  # opens the experiment; the two runs below are as a killed stage and a live one leave them
    experiment = client.get_experiment_by_name("mimflow").experiment_id
    host = socket.gethostname()

    def left_running(stage: str, pid: int):
        tags = {"mimflow.stage": stage, "mimflow.host": host, "mimflow.pid": str(pid)}
        return client.create_run(experiment, tags=tags)

    killed = left_running("pretrain_mae", dead_pid())
    alive = left_running("pretrain_mae", os.getppid())
    other = left_running("prepare", dead_pid())
    again = tracker(root)
    again.start("pretrain_mae", {"pretrain_mae": {"epochs": 1}})
    again.end()
    status = {r: client.get_run(r.info.run_id).info.status for r in (killed, alive, other)}
    assert [status[killed], status[alive], status[other]] == ["KILLED", "RUNNING", "RUNNING"]
    assert client.get_run(again.run_id).data.tags["mimflow.pid"] == str(os.getpid())


def test_runs_are_named_by_stage_and_commit_or_experiment_in_a_training_experiment(store, rest, monkeypatch):
    root, _, commit = store
    t = tracker(root)
    t.start("finetune@mae", {"finetune": {"epochs": 2}})
    t.end()
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-bass")
    e = tracker(root)
    e.start("finetune@mae", {"finetune": {"epochs": 2}})
    e.end()
    runs = [rest.get("/api/2.0/mlflow/runs/get", query_string={"run_id": r.run_id}).get_json()["run"] for r in (t, e)]
    assert [r["info"]["run_name"] for r in runs] == [f"finetune@mae · {commit[:7]}", "finetune@mae · tidy-bass"]
    query = {"experiment_name": "mimflow"}
    experiment = rest.get("/api/2.0/mlflow/experiments/get-by-name", query_string=query).get_json()
    tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    assert tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] == "custom_model_development"


def test_constants_are_params_results_share_the_step_axis_and_figures_are_images(store, rest, tmp_path):
    from PIL import Image

    root, _, _ = store
    t = tracker(root)
    t.start(
        "pretrain_mae",
        {"pretrain_mae": {"epochs": 3}, "runtime": {"seed": 0}},
        upstream={"prepare": {"classification": {"image_size": 32}}},
    )
    for step in (2, 4, 6):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
    figure = tmp_path / "reconstructions.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(figure)
    t.log_figure(figure)
    t.log_results(
        {
            "train_loss": 0.25,
            "steps": 6,
            "epochs": 3,
            "peak_lr": 0.001,
            "effective_batch": 16,
            "resumed_from_step": None,
            "init": "mae",
            "wall_time_s": 1.5,
            "layers": ["a", "b"],
        }
    )
    t.end()
    run = rest.get("/api/2.0/mlflow/runs/get", query_string={"run_id": t.run_id}).get_json()["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    constants = {"steps": "6", "epochs": "3", "peak_lr": "0.001", "effective_batch": "16", "resumed_from_step": "None"}
    assert {**constants, "init": "mae"}.items() <= params.items()
    assert params["prepare.classification.image_size"] == "32" and params["pretrain_mae.epochs"] == "3"
    assert set(metrics) == {"loss", "lr", "train_loss", "wall_time_s"}
    assert {metrics[k]["step"] for k in ("train_loss", "wall_time_s")} == {6}  # the results sit at the end of the axis

    def listed(path: str) -> list[str]:
        query = {"run_id": t.run_id, "path": path}
        files = rest.get("/api/2.0/mlflow/artifacts/list", query_string=query).get_json()["files"]
        return sorted(f["path"] for f in files)

    names = [p.split("/")[-1] for p in listed("images")]
    assert len(names) == 2 and all(n.startswith("reconstructions+step+6+") for n in names), names  # PNG and preview
    assert listed("figures") == ["figures/reconstructions.png"]


def test_the_alias_moves_only_on_a_strict_improvement_on_the_same_data_and_params(store):
    import mlflow

    root, uri, _ = store
    client = mlflow.MlflowClient(uri)
    name = "mimflow-test-alias"

    def register(top1: float, data: str = "d1", params: dict | None = None) -> bool:
        t = tracker(root)
        t.start("finetune@mae", params or {"finetune": {"epochs": 2}})
        t.log_metrics({"top1": top1})
        moved = t.log_model(
            torch.nn.Linear(2, 2),
            name="classifier",
            registered_name=name,
            score=("top1", top1),
            data=data,
            serialization_format="pickle",
        )
        t.end()
        return moved

    assert register(50.0)  # no version held it
    assert not register(50.0)  # a tie keeps it
    assert not register(40.0)
    assert register(60.0)
    assert not register(90.0, data="d2")  # other data: not comparable
    assert not register(90.0, params={"finetune": {"epochs": 3}})  # other params: not comparable
    holder = client.get_model_version_by_alias(name, "best")
    assert str(holder.version) == "4" and holder.tags["mimflow.data"] == "d1"


def test_the_flow_run_closes_its_killed_children_and_is_not_left_empty(store, rest, monkeypatch):
    import mlflow

    root, uri, _ = store
    client = mlflow.MlflowClient(uri)

    def info(run_id: str) -> dict:  # through the REST API, as the UI reads it
        return rest.get("/api/2.0/mlflow/runs/get", query_string={"run_id": run_id}).get_json()["run"]

    empty = tracker(root)
    empty.start("flow", {"flow": {"stages": "prepare"}})
    empty.finish_parent("FINISHED", {"stages_selected": 1})
    assert info(empty.run_id)["info"]["lifecycle_stage"] == "deleted"

    parent = tracker(root)
    parent.start("flow", {"flow": {"stages": "prepare,pretrain_mae"}})
    monkeypatch.setenv("MIMFLOW_PARENT_RUN_ID", parent.run_id)
    experiment = client.get_run(parent.run_id).info.experiment_id
    done = client.create_run(experiment, tags={"mlflow.parentRunId": parent.run_id})
    client.set_terminated(done.info.run_id, "FINISHED")
    killed = client.create_run(experiment, tags={"mlflow.parentRunId": parent.run_id})
    parent.finish_parent("FAILED", {"stages_selected": 2, "stages_done": 1})
    run = info(parent.run_id)
    assert run["info"]["status"] == "FAILED" and run["info"]["lifecycle_stage"] == "active"
    assert info(killed.info.run_id)["info"]["status"] == "KILLED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {k: metrics[k] for k in ("stages_selected", "stages_done", "stages_finished", "stages_killed")} == {
        "stages_selected": 2,
        "stages_done": 1,
        "stages_finished": 1,
        "stages_killed": 1,
    }


def test_a_downstream_run_records_the_params_of_the_stages_upstream_of_it(project):
    from pipelines.flow import stage_order

    params = micro_config()
    finetune_mae = next(s for s in stage_order(project) if s.startswith("finetune@") and "mae" in s)
    upstream = upstream_params(project, finetune_mae, params)
    assert upstream["pretrain_mae"]["mask_ratio"] == params.pretrain_mae.mask_ratio
    assert "prepare" in upstream and "finetune" not in upstream and "runtime" not in upstream
    baselines = upstream_params(project, "baselines", params)  # reads the data only, no encoder
    assert "prepare" in baselines and "pretrain_mae" not in baselines and "pretrain_ibot" not in baselines
    assert upstream_params(project, "no_such_stage", params) == {}
