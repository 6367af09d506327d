"""Stage tests run the real CLI (`dvc repro`, `python -m pipelines.<stage>`) in a temporary git + DVC
copy of the project whose params.yaml is the micro params (params.yaml with tests/micro.params.yaml's
overrides) and whose MLflow store is a temporary SQLite file."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COPY = ["components", "pipelines", "datasets", "dvc.yaml", ".dvcignore", "pyproject.toml", ".gitignore"]
MICRO = REPO / "tests" / "micro.params.yaml"


def merge_overrides(base: dict, overrides: dict, where: str = "") -> dict:
    """``base`` with ``overrides`` merged in, mapping by mapping (a list or a scalar replaces the base's value).
    An override of a mapping by a non-mapping, or of a non-mapping by a mapping, is an error naming the key;
    keys the schema does not know are caught when the result is validated."""
    merged = dict(base)
    for key, value in overrides.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            if not isinstance(base.get(key, {}), dict):
                raise ValueError(f"{MICRO.name}: {path}: a mapping overrides params.yaml's {base[key]!r}")
            merged[key] = merge_overrides(base.get(key) or {}, value, f"{path}.")
        elif isinstance(base.get(key), dict):
            raise ValueError(f"{MICRO.name}: {path} = {value!r}: overrides a whole section of params.yaml")
        else:
            merged[key] = value
    return merged


def params_section(cls, path: str, **overrides):
    """A params section as params.yaml writes it (the schema has no defaults), with ``overrides`` merged in."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for part in path.split("."):
        raw = raw[part]
    return cls.model_validate(merge_overrides(raw, overrides))


def micro_params() -> dict:
    """The micro params as a dict (tests/micro.params.yaml merged onto params.yaml), to change a value and
    validate it. Validated here, so an override the schema does not know fails every test that uses it."""
    from pipelines.config import read_yaml, validate_params

    merged = merge_overrides(read_yaml(REPO / "params.yaml"), read_yaml(MICRO))
    validate_params(merged, f"{MICRO.name} merged onto params.yaml")
    return merged


def micro_config():
    """The validated micro params (``pipelines.config.Params``)."""
    from pipelines.config import validate_params

    return validate_params(micro_params())


def make_project(dest: Path, params: Path | None = None) -> Path:
    """Copy the project's code and dvc.yaml into ``dest`` as a fresh git + DVC repository whose params.yaml
    is ``params``, or the micro params (params.yaml with tests/micro.params.yaml's overrides)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if params is None:
        import yaml

        (dest / "params.yaml").write_text(yaml.safe_dump(micro_params(), sort_keys=False))
    else:
        shutil.copy2(params, dest / "params.yaml")
    env = project_env(dest)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


@contextlib.contextmanager
def mlflow_rest(uri: str):
    """The tracking server's REST API (``/api/2.0/mlflow/...``) on the store ``uri``: MLflow's Flask app as a test
    client, no server process."""
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR, app, handlers

    saved = handlers._tracking_store, handlers._model_registry_store, os.environ.get(BACKEND_STORE_URI_ENV_VAR)
    handlers._tracking_store = handlers._model_registry_store = None
    os.environ[BACKEND_STORE_URI_ENV_VAR] = uri
    try:
        yield app.test_client()
    finally:
        handlers._tracking_store, handlers._model_registry_store = saved[:2]
        if saved[2] is None:
            os.environ.pop(BACKEND_STORE_URI_ENV_VAR, None)
        else:
            os.environ[BACKEND_STORE_URI_ENV_VAR] = saved[2]


def project_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        PREFECT_HOME=str(root / ".prefect"),
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(root),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    env.pop("MIMFLOW_PARENT_RUN_ID", None)
    return env


def run(root: Path, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the project; on an unexpected exit code fail with its output."""
    proc = subprocess.run(list(cmd), cwd=root, env=project_env(root), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def dvc_repro(root: Path, *targets: str) -> subprocess.CompletedProcess:
    return run(root, str(BIN / "dvc"), "repro", *targets)


def kill_at_first_checkpoint(root: Path, stage: str) -> None:
    """Start ``python -m pipelines.<stage>`` in ``root`` and kill -9 it as soon as its first checkpoint
    exists (within 5 minutes), as a crash or a pre-empted job would."""
    ckpt = root / "checkpoints" / stage / "last.pt"
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", f"pipelines.{stage}"],
        cwd=root,
        env=project_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """One micro project shared by the stage tests (stages reuse upstream outputs through DVC)."""
    return make_project(tmp_path_factory.mktemp("micro") / "project")
