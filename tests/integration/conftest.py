"""Team mode, tested on one machine: every server binds 127.0.0.1 on a free port and is stopped by the fixture
that started it. The micro project here runs prepare, pretrain_mae and finetune@mae-0 once, logging to the team
MLflow server (PostgreSQL-backed), for the tests that read those runs back, compare with its weights or push it
to a DVC remote: one training run serves them all, inside CI's budget."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.team_server import TeamServer, postgres_bindir
from tests.pipelines.conftest import BIN, REPO, make_project, project_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MICRO_EXPERIMENT = "mimflow-team-micro"  # the MLflow experiment the shared micro project logs to


def set_params(root: Path, **sections: dict) -> None:
    """Update sections of ``root``'s params.yaml, e.g. ``tracking={"enabled": False}``."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_with_data(source: Path, dest: Path, **sections: dict) -> Path:
    """A fresh micro project at ``dest`` with ``source``'s prepared data, MLflow off and ``sections`` applied."""
    root = make_project(dest)
    shutil.copytree(source / "data" / "classification", root / "data" / "classification")
    set_params(root, **{"tracking": {"enabled": False}, **sections})
    return root


@pytest.fixture(scope="session")
def team_server(tmp_path_factory):
    """PostgreSQL + `mlflow server` on free ports of 127.0.0.1, started and stopped by the commands that
    `make team-up` / `make team-down` run (the cluster removed at the end); None (the MLflow test skips) only
    when PostgreSQL is missing and apt-get is not there to install it."""
    if postgres_bindir() is None:
        if shutil.which("apt-get") is None:
            yield None
            return
        pytest.fail("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)", pytrace=False)
    state = tmp_path_factory.mktemp("team-server")
    team = [str(BIN / "python"), "-m", "pipelines.team_server"]
    up = subprocess.run([*team, "up", "--state", str(state)], cwd=REPO, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"make team-up: {up.stderr.strip()}", pytrace=False)
    server = TeamServer.load(state)
    assert f"MLFLOW_TRACKING_URI={server.uri}" in up.stdout.splitlines()
    try:
        yield server
    finally:
        down = subprocess.run(
            [*team, "down", "--state", str(state)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stderr
        assert not Path(server.pgdata).exists() and TeamServer.load(state) is None


@pytest.fixture(scope="session")
def micro(tmp_path_factory, team_server) -> Path:
    """A micro project after `dvc repro pretrain_mae`, logged to the team server through MLFLOW_TRACKING_URI
    alone, and `finetune@mae-0`, which registers its classifier there (MLflow off and no finetune when there is
    no server)."""
    root = make_project(tmp_path_factory.mktemp("team") / "a")
    env = project_env(root)
    targets = ["pretrain_mae"]
    if team_server is None:
        set_params(root, tracking={"enabled": False})
    else:
        env["MLFLOW_TRACKING_URI"] = team_server.uri
        # its own experiment: the deployment tests' worker logs its prepare runs to the same server
        set_params(root, tracking={"experiment": MICRO_EXPERIMENT})
        targets.append("finetune@mae-0")
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro", *targets], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(
            f"dvc repro {' '.join(targets)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        )
    return root
