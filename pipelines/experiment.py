"""Experiments as Prefect deployment runs: a DVC experiment with parameter overrides, run where a worker
picked it up and collected in one place.

The flow takes an experiment name and overrides in ``dvc exp run -S`` syntax (``pretrain_mae.mask_ratio=0.6``,
optionally prefixed ``params.yaml:``), checks them against the params schema first (a bad key or value is one
line naming it, before anything runs), then runs ``dvc exp run --temp -n <name> -S ... [stages]`` in the
checkout the deployment's pull steps prepared. ``--temp`` runs the experiment in its own copy of the
workspace (under ``.dvc/tmp/exps``), so two flow runs on one worker's checkout do not collide. Finally it
pushes the experiment with ``dvc exp push <git remote> <name>``: its git ref to the repository the checkout
came from and its outputs to the default DVC remote, where ``dvc exp pull`` + ``dvc exp show`` in any clone
find it. The stages' MLflow runs are tagged ``dvc.exp_name`` (DVC passes ``DVC_EXP_NAME`` to the stages) and
``prefect.flow_run_id`` (``MIMFLOW_FLOW_RUN_ID``, set here).

Run it through the deployment (``prefect deployment run mimflow-experiment/mimflow-experiment --params '{...}'``,
docs/team.md) or locally: ``python -m pipelines.experiment <name> key=value ... [--stage S ...]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_k, _v)

import yaml  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from pipelines.config import ParamsError, read_yaml, validate_params  # noqa: E402
from pipelines.tracking import FLOW_RUN_ENV  # noqa: E402

PARAMS_FILE = "params.yaml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``[params.yaml:]a.b.c=value`` as ``(["a", "b", "c"], value)``, the value read as YAML (as DVC reads
    it: ``0.6`` is a float, ``[10,20]`` a list, ``null`` None). Other files than params.yaml are refused:
    the schema covers params.yaml only."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected key=value (as `dvc exp run -S`)")
    if ":" in key:
        file, _, key = key.rpartition(":")
        if file != PARAMS_FILE:
            raise ParamsError(f"override {text!r}: only {PARAMS_FILE} can be overridden, not {file}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override {text!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), parsed


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` (params.yaml as a dict) with ``overrides`` applied; a key params.yaml does not have is an
    error naming it and the keys that are there (``dvc exp run -S`` refuses it too)."""
    import copy

    out = copy.deepcopy(params)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(path[:i]) or "the top level"
                known = ", ".join(sorted(node)) if isinstance(node, dict) else f"a {type(node).__name__}"
                raise ParamsError(f"override {text!r}: {PARAMS_FILE} has no key {'.'.join(path)} ({where}: {known})")
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def check_overrides(overrides: list[str], root: Path = ROOT) -> None:
    """Validate ``root``'s params.yaml with ``overrides`` applied against the schema (pipelines.config);
    ParamsError with one line naming the override's key otherwise."""
    merged = apply_overrides(read_yaml(root / PARAMS_FILE), overrides)
    validate_params(merged, f"{PARAMS_FILE} with {' '.join(overrides) or 'no overrides'}")


def dvc(*args: str) -> list[str]:
    """The environment's dvc (the flow's interpreter's), activated or not."""
    return [str(Path(sys.executable).parent / "dvc"), *args]


def stream(cmd: list[str], root: Path, env: dict[str, str], logger) -> None:
    """Run ``cmd`` in ``root``, its output line by line into ``logger``; RuntimeError with the last line on
    a non-zero exit."""
    logger.info("$ %s", " ".join(cmd))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env={**os.environ, "PATH": path, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
            last = line
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {last}")


def default_dvc_remote(root: Path) -> str | None:
    proc = subprocess.run(dvc("remote", "default"), cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def experiment_ref(root: Path, name: str) -> str | None:
    """The commit of experiment ``name`` (its ``refs/exps/.../<name>`` ref)."""
    refs = subprocess.run(["git", "show-ref"], cwd=root, capture_output=True, text=True).stdout.splitlines()
    return next((line.split()[0] for line in refs if line.endswith(f"/{name}") and " refs/exps/" in line), None)


@flow(name="mimflow-experiment", flow_run_name="exp-{name}", log_prints=True)
def mimflow_experiment(
    name: str,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    git_remote: str = "origin",
    push: bool = True,
    root: str | None = None,
) -> dict:
    """Run ``stages`` (all when None) as DVC experiment ``name`` with ``overrides`` (``key=value``, as
    ``dvc exp run -S``) and push it to ``git_remote`` and the default DVC remote. ``root``: the project
    (default: the checkout this module is in, decided where the flow runs, not where it was deployed)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    overrides = list(overrides or [])
    project = Path(root) if root else ROOT
    check_overrides(overrides, project)  # a bad key or value: the flow run fails with one line, nothing ran
    env = {FLOW_RUN_ENV: str(flow_run.id)} if flow_run.id else {}
    sets = [arg for text in overrides for arg in ("-S", text)]
    stream(dvc("exp", "run", "--temp", "-n", name, *sets, *(stages or [])), project, env, logger)
    rev = experiment_ref(project, name)
    pushed = None
    if push:
        remote = default_dvc_remote(project)
        if remote is None:  # the ref still reaches the repository; outputs stay on this machine
            logger.warning("no default DVC remote: pushing experiment %s without its outputs (--no-cache)", name)
        stream(dvc("exp", "push", *([] if remote else ["--no-cache"]), git_remote, name), project, env, logger)
        pushed = {"git": git_remote, "dvc": remote}
    lines = [f"## Experiment {name}", "", f"- commit: `{rev}`", f"- stages: {', '.join(stages or ['all'])}"]
    lines += [f"- `{text}`" for text in overrides] + [f"- pushed: {pushed}"]
    create_markdown_artifact(key=f"experiment-{name.lower()}", markdown="\n".join(lines) + "\n", description=name)
    return {"name": name, "rev": rev, "overrides": overrides, "stages": stages, "pushed": pushed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.experiment", description=mimflow_experiment.__doc__)
    parser.add_argument("name", help="the experiment's name (dvc exp run -n)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of params.yaml (dvc exp run -S)")
    parser.add_argument("--stage", action="append", dest="stages", help="a stage to run (repeatable; default all)")
    parser.add_argument("--no-push", action="store_true", help="keep the experiment local")
    parser.add_argument("--git-remote", default="origin")
    args = parser.parse_args(argv)
    try:  # what is wrong before anything runs is one line, not a flow run's traceback
        check_overrides(args.overrides)
    except ParamsError as e:
        print(f"error: experiment: {e}", file=sys.stderr)
        return 2
    mimflow_experiment(
        name=args.name, overrides=args.overrides, stages=args.stages, git_remote=args.git_remote, push=not args.no_push
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
