"""The team's MLflow server (pipelines/team_server.py, `make team-up`): PostgreSQL as the backend store and
artifacts served by the server. Micro stages pointed at it by MLFLOW_TRACKING_URI alone land their params,
metrics, figure and registered model (with its alias) there, read back through the REST API; a server that
cannot start is one line."""

from __future__ import annotations

import json
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipelines.team_server import DB, HOST, PG_USER, TeamServer, TeamServerError
from tests.integration.conftest import MICRO_EXPERIMENT
from tests.pipelines.conftest import micro_config


def rest(server: TeamServer, endpoint: str, **query) -> dict:
    url = f"{server.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def rest_post(server: TeamServer, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{server.uri}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.integration
def test_stages_log_params_metrics_figure_and_model_to_the_postgres_backed_server(micro, team_server):
    """The shared micro project ran `dvc repro pretrain_mae finetune@mae-0` with MLFLOW_TRACKING_URI=<the server>."""
    if team_server is None:
        pytest.skip("PostgreSQL is not installed and apt-get is unavailable to install it")
    root = micro
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists(), "logged locally, not to the server"
    metrics = json.loads((root / "metrics" / "pretrain_mae.json").read_text())
    cfg = micro_config().pretrain_mae

    experiment = rest(team_server, "experiments/get-by-name", experiment_name=MICRO_EXPERIMENT)["experiment"]
    runs = rest_post(
        team_server,
        "runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'pretrain_mae'"},
    ).get("runs", [])
    assert len(runs) == 1, f"{len(runs)} pretrain_mae runs on the server"
    prepare = rest_post(
        team_server,
        "runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'prepare'"},
    ).get("runs", [])
    assert len(prepare) == 1 and prepare[0]["info"]["status"] == "FINISHED", "dvc repro's prepare run is missing"
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["pretrain_mae.mask_ratio"] == str(cfg.mask_ratio)
    assert params["pretrain_mae.batch_size"] == str(cfg.batch_size)
    logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert logged["val_masked_loss"] == pytest.approx(metrics["val_masked_loss"])
    history = rest(team_server, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    rows = (root / "plots" / "pretrain_mae" / "loss.csv").read_text().splitlines()[1:]
    assert [m["step"] for m in history] == [int(r.split(",")[0]) for r in rows]

    # the figure went through the server (mlflow-artifacts:/) into its --artifacts-destination
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    listed = {f["path"] for f in rest(team_server, "artifacts/list", run_id=run_id, path="figures").get("files", [])}
    assert "figures/reconstructions.png" in listed
    png = (root / "plots" / "pretrain_mae" / "reconstructions.png").read_bytes()
    with urllib.request.urlopen(
        f"{team_server.uri}/get-artifact?"
        f"{urllib.parse.urlencode({'path': 'figures/reconstructions.png', 'run_id': run_id})}",
        timeout=30,
    ) as r:
        assert r.read() == png
    stored = list(Path(team_server.artifacts).rglob("reconstructions.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == png

    # finetune@mae registered its classifier, and the registry alias points at that run's version
    version = rest(team_server, "registered-models/alias", name="mimflow-finetune-mae", alias="best")["model_version"]
    assert version["status"] == "READY"
    finetune = rest(team_server, "runs/get", run_id=version["run_id"])["run"]
    assert {t["key"]: t["value"] for t in finetune["data"]["tags"]}["mimflow.stage"] == "finetune@mae-0"
    top1 = json.loads((root / "metrics" / "finetune" / "mae-0.json").read_text())["top1"]
    assert {m["key"]: m["value"] for m in finetune["data"]["metrics"]}["top1"] == pytest.approx(top1)

    # and the run is a row of PostgreSQL's database, not of a file store
    import psycopg

    with psycopg.connect(host=HOST, port=team_server.pg_port, user=PG_USER, dbname=DB) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    assert row == ("FINISHED",)


def test_a_taken_port_is_one_line_before_anything_starts(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((HOST, 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(TeamServerError) as err:
            TeamServer.start(tmp_path / "artifacts", tmp_path, port=port)
    assert str(err.value) == f"MLflow server: port {port} on {HOST} is taken; pick another or stop what holds it"
    assert not list(tmp_path.iterdir()), "started something before finding the port taken"


def test_missing_postgres_is_one_line(tmp_path, monkeypatch):
    import pipelines.team_server as team_server

    monkeypatch.setattr(team_server, "postgres_bindir", lambda: None)
    with pytest.raises(TeamServerError, match=r"^PostgreSQL is not installed .*apt-get install postgresql$"):
        TeamServer.start(tmp_path / "artifacts", tmp_path)
