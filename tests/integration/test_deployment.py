"""The Prefect deployments as a user runs them: the README's deployment block, run as written in a git copy of
the project with the micro params, and then experiments launched as deployment runs through the pool, worker
and deployment that block made (one Prefect server for both tests). The worker clones the deployed commit from
the repository named by the Prefect variable (prefect.yaml's pull steps), so a flow run needs nothing of the
deploying checkout but its git history. The server binds 127.0.0.1 on a free port; it and the worker are
stopped (the block's process group) when the module's tests are done."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from pipelines.config import ParamsError
from pipelines.experiment import apply_overrides, check_overrides, parse_override
from tests.integration.conftest import free_port
from tests.pipelines.conftest import BIN, REPO, make_project, project_env

BEGIN, END = "<!-- prefect-deployment:begin -->", "<!-- prefect-deployment:end -->"
STAGES = ["prepare"]  # the cheapest stage: a flow run here is about the deployment, not the training


def readme_block() -> str:
    """The shell commands of the README's deployment block, exactly as written there."""
    text = (REPO / "README.md").read_text()
    assert BEGIN in text and END in text, f"README.md lacks the {BEGIN} ... {END} block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, "the README's deployment block holds no ```bash fence"
    return match.group(1)


def deploy_project(dest: Path) -> Path:
    """A git copy of the project (micro params) with what `prefect deploy` and the worker's pull steps read,
    and `.venv` pointing at this environment (the README block activates it)."""
    root = make_project(dest)
    for name in ("prefect.yaml", "constraints.txt"):
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(BIN.parent)  # a link, which .gitignore's `/.venv/` (a directory) does not match
    with (root / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("/.venv\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "deployment files")
    return root


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, env=project_env(root), capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """The project's test environment without what a user would not have set: no PYTHONPATH (the flow run must
    import the worker's checkout, not this one) and no MLFLOW_TRACKING_URI unless given."""
    env = project_env(root)
    for key in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MIMFLOW_WORKSPACE", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s whole process group (a shell and what it started in the background, or a server and its
    children): SIGTERM, then SIGKILL after 8 s."""
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.2)


def api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the test's own server)
        return json.loads(response.read())


def flow_runs(api_url: str, deployment: str) -> list[dict]:
    [dep] = [d for d in api(api_url, "/deployments/filter", {}) if d["name"] == deployment]
    return api(api_url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the override check: one line naming the key, before anything runs (fast, no servers) ---


def test_overrides_are_checked_against_the_params_schema():
    assert parse_override("params.yaml:pretrain_mae.mask_ratio=0.6") == (["pretrain_mae", "mask_ratio"], 0.6)
    assert parse_override("prepare.classification.rotation=[0, 90]")[1] == [0, 90]
    check_overrides(["pretrain_mae.mask_ratio=0.6", "prepare.classification.train_per_class=10"], REPO)
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2"]) == {"a": {"b": 2}} and raw == {"a": {"b": 1}}
    bad = {
        "pretrain_mae.mask_ration=0.6": "pretrain_mae.mask_ration",  # a typo'd key
        "pretrain_mae.mask_ratio=lots": "mask_ratio",  # a value of the wrong type
        "other.yaml:prepare.seed=1": "only params.yaml",
        "pretrain_mae.mask_ratio": "key=value",
    }
    for text, named in bad.items():
        with pytest.raises(ParamsError) as info:
            check_overrides([text], REPO)
        message = str(info.value)
        assert named in message and "\n" not in message, message


# --- the README's deployment block, as written, and experiments through the deployment it made ---


class Deployment(NamedTuple):
    root: Path  # the deploying checkout (the repository the worker clones from)
    api_url: str
    returncode: int
    output: str
    tracking_uri: str  # where the worker's stages log: the team MLflow server (or its checkout's mlflow.db)

    @property
    def checkout(self) -> Path:
        """The worker's checkout (the block's MIMFLOW_WORKSPACE)."""
        return self.root / ".prefect" / "workspace" / "mimflow"


@pytest.fixture(scope="module")
def readme_deployment(tmp_path_factory, team_server):
    """The README's deployment block run as written in a git copy of the project (micro params, a local DVC
    remote), with PORT a free port and RUN the micro `prepare` stage, and MLFLOW_TRACKING_URI the team MLflow
    server (PostgreSQL) exported before it, as docs/team.md says (the worker's mlflow.db where PostgreSQL is
    missing). Its server and worker stay up for the module's tests and are stopped (the block's process group)
    at the end."""
    tmp = tmp_path_factory.mktemp("deployment")
    root = deploy_project(tmp / "repo")
    run_ok([str(BIN / "dvc"), "remote", "add", "-d", "store", str(tmp / "dvc-store")], root, project_env(root))
    git(root, "commit", "-qam", "the DVC remote")
    port = free_port()
    # PREFECT_WORKER_QUERY_SECONDS: the worker looks for scheduled runs every 2 s instead of 10 (CI's budget)
    env = clean_env(root, PORT=str(port), RUN=json.dumps({"stages": STAGES}), PREFECT_WORKER_QUERY_SECONDS="2")
    tracking = (
        team_server.uri if team_server else f"sqlite:///{root / '.prefect' / 'workspace' / 'mimflow' / 'mlflow.db'}"
    )
    if team_server:
        env["MLFLOW_TRACKING_URI"] = tracking
    shell = subprocess.Popen(
        ["bash", "-e", "-c", readme_block()],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            out, _ = shell.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail("the README's deployment block did not finish in 420 s", pytrace=False)
        yield Deployment(root, f"http://127.0.0.1:{port}/api", shell.returncode, out, tracking)
    finally:
        stop_group(shell)
    assert not port_open(port), f"the Prefect server still listens on 127.0.0.1:{port}"


def worker_logs(root: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (root / ".prefect").glob("*.log"))


@pytest.mark.integration
def test_readme_deployment_block_runs_as_written(readme_deployment):
    """README's block: server in the background, health wait, work pool, the repository variable,
    `prefect deploy --all`, a worker, `prefect deployment run --watch` of the micro `prepare` stage (the
    block's RUN variable). The flow run ends Completed and the stage's metrics are in the worker's checkout of
    the deployed commit, cloned from the repository variable; nothing ran in the deploying checkout."""
    d = readme_deployment
    assert d.returncode == 0, f"the block exited {d.returncode}\n{d.output[-4000:]}{worker_logs(d.root)}"
    assert "Completed" in d.output, d.output[-3000:]
    [run] = flow_runs(d.api_url, "mimflow-default")
    assert run["state_type"] == "COMPLETED" and run["parameters"]["stages"] == STAGES, run
    assert git(d.checkout, "rev-parse", "HEAD") == git(d.root, "rev-parse", "HEAD")
    assert git(d.checkout, "remote", "get-url", "origin") == str(d.root)
    metrics = json.loads((d.checkout / "metrics" / "prepare.json").read_text())
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values() if not isinstance(v, dict)), metrics
    assert not (d.root / "metrics" / "prepare.json").exists(), "the flow ran in the deploying checkout"


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.integration
def test_experiments_as_deployment_runs(readme_deployment, tmp_path):
    """Two `mimflow-experiment` deployment runs with different overrides through the README block's pool, whose
    one worker takes two at a time in one checkout (`dvc exp run --temp` keeps them apart): both complete, and
    overlap; a fresh clone sees both with `dvc exp pull` + `dvc exp show` (params, metrics, and outputs from the
    DVC remote); the MLflow store has both experiments' runs, tagged with the experiment name and the id of the
    flow run that made it."""
    d = readme_deployment
    assert d.returncode == 0, "the README's deployment block failed (see test_readme_deployment_block_runs_as_written)"
    prefect, dvc = str(BIN / "prefect"), str(BIN / "dvc")
    env = clean_env(d.root, PREFECT_HOME=str(d.root / ".prefect"), PREFECT_API_URL=d.api_url)
    experiments = {"exp-a": 10, "exp-b": 11}
    runs = {
        name: subprocess.Popen(
            [
                prefect,
                "deployment",
                "run",
                "mimflow-experiment/mimflow-experiment",
                "--watch",
                "--params",
                json.dumps(
                    {"name": name, "stages": STAGES, "overrides": [f"prepare.classification.train_per_class={n}"]}
                ),
            ],
            cwd=d.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, n in experiments.items()
    }
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}: {outputs[name][-3000:]}{worker_logs(d.root)}"
    done = flow_runs(d.api_url, "mimflow-experiment")
    assert sorted(r["state_type"] for r in done) == ["COMPLETED", "COMPLETED"], done
    run_ids = {r["parameters"]["name"]: r["id"] for r in done}
    spans = sorted((r["start_time"], r["end_time"]) for r in done)
    assert spans[1][0] < spans[0][1], f"the worker (limit 2) ran them one after the other: {spans}"

    fresh = tmp_path / "fresh"
    run_ok(["git", "clone", "-q", str(d.root), str(fresh)], tmp_path, project_env(d.root))
    fenv = project_env(fresh)
    run_ok([dvc, "exp", "pull", "origin", *experiments], fresh, fenv)
    shown = json.loads(run_ok([dvc, "exp", "show", "--json"], fresh, fenv))
    found = {
        exp["name"]: {**exp["data"], "rev": exp["rev"]}
        for commit in shown
        for branch in commit.get("experiments") or []
        for exp in branch.get("revs") or []
        if exp.get("name") in experiments
    }
    assert set(found) == set(experiments), shown
    for name, n in experiments.items():
        assert found[name]["params"]["params.yaml"]["data"]["prepare"]["classification"]["train_per_class"] == n
        assert found[name]["metrics"]["metrics/prepare.json"]["data"], found[name]
        lock = yaml.safe_load(git(fresh, "show", f"{found[name]['rev']}:dvc.lock"))
        [out] = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/classification"]
        cached = fresh / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
        assert cached.is_file(), f"{name}'s data/classification ({out['md5']}) did not come from the DVC remote"

    import mlflow

    client = mlflow.MlflowClient(d.tracking_uri)  # the team server the worker was started with
    tagged = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`dvc.exp_name` != ''", max_results=100
    )
    by_exp = {(r.data.tags["dvc.exp_name"], r.data.tags.get("prefect.flow_run_id")) for r in tagged}
    assert by_exp == {(name, run_ids[name]) for name in experiments}, by_exp
