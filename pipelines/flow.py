"""The Prefect flow: the DVC pipeline, stage by stage, with retries, logs, artifacts and one parent
MLflow run.

The stage order is read from dvc.yaml through DVC's own graph (``Repo.index.graph``), never a second
hand-written list. Each stage is a Prefect task that runs ``dvc repro --single-item <stage>`` (DVC skips
it when it is up to date), streams its output into Prefect's log, and publishes a Markdown artifact of
the stage's metrics. Every stage's MLflow run is nested under the flow's run via ``MIMFLOW_PARENT_RUN_ID``;
at the end the flow's run records how many stages were selected and done and how its children ended (a
child a killed stage left RUNNING is set KILLED), and it is deleted when no stage ran (all up to date).

Run it with ``python -m pipelines.flow`` (a temporary local Prefect server starts when no
``PREFECT_API_URL`` is set; its database lives in ``.prefect/`` inside the project).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_k, _v)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from pipelines.config import ParamsError, load_params  # noqa: E402
from pipelines.tracking import PARENT_RUN_ENV, Tracker, TrackingError, check_reachable, resolve_uri  # noqa: E402


class StageInputError(RuntimeError):
    """A stage stopped on bad input (its one-line ``error:`` message): running it again cannot help."""


def stage_order(root: Path = ROOT) -> list[str]:
    """Stage names (``finetune@mae`` for matrix items) in an order that respects dvc.yaml's DAG,
    ties broken by the order of dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to its dependencies
        stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
        position = {s: i for i, s in enumerate(repo.index.stages)}
        ordered = nx.lexicographical_topological_sort(
            graph.reverse(copy=True).subgraph(stages), key=lambda s: f"{position.get(s, 0):06d}"
        )
        return [s.name for s in ordered]


def select_stages(stages: list[str] | None, root: Path = ROOT) -> list[str]:
    """``stages`` (all when None) in the DAG's order; an unknown name is a ValueError listing the known."""
    order = stage_order(root)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has: {', '.join(order)}")
    return [s for s in order if not stages or s in stages]


def stage_metrics_files(stage: str, root: Path = ROOT) -> list[Path]:
    """The metrics files a stage declares in dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if s.name == stage:
                return [Path(o.fs_path) for o in s.outs if o.metric]
    return []


def metrics_markdown(stage: str, files: list[Path]) -> str:
    lines = [f"## {stage}", "", "| metric | value |", "|---|---|"]
    for path in files:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key, value in _flat(data).items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage that crashed (a lost node, an OOM kill), not one that
    stopped on bad input."""
    return not isinstance(state.data, StageInputError) and "StageInputError" not in (state.message or "")


@task(task_run_name="{stage}", retry_condition_fn=retry_unless_bad_input)
def run_dvc_stage(stage: str, root: str, env: dict[str, str], force: bool = False) -> dict:
    """Run one DVC stage, streaming its log into Prefect; publish its metrics as a Markdown artifact.
    dvc.yaml's ``python`` is the flow's own interpreter, activated or not."""
    logger = get_run_logger()
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "dvc"), "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("$ %s", " ".join(cmd))
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
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
    tail: list[str] = []
    input_error = None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
            tail = (tail + [line])[-5:]
            if line.startswith(f"error: {stage}: "):  # the stage's one-line message on bad input
                input_error = line
    if proc.wait() != 0:
        if input_error:
            raise StageInputError(f"stage {stage} stopped on bad input: {input_error}")
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
    files = stage_metrics_files(stage, Path(root))
    markdown = metrics_markdown(stage, files)
    key = re.sub(r"[^a-z0-9-]", "-", stage.lower())
    create_markdown_artifact(key=f"{key}-metrics", markdown=markdown, description=f"metrics of {stage}")
    summary = Path(root) / "reports" / "summary.md"
    if stage == "report" and summary.is_file():
        create_markdown_artifact(
            key="mimflow-report", markdown=summary.read_text(), description="the results page (reports/index.html)"
        )
    return {str(p): json.loads(p.read_text()) for p in files if p.is_file()}


@flow(name="mimflow", log_prints=True)
def mimflow_pipeline(
    stages: list[str] | None = None,
    force: bool = False,
    retries: int = 1,
    retry_delay_seconds: int = 10,
    root: str = str(ROOT),
) -> dict:
    """Run the DVC pipeline stage by stage (all of it, or ``stages``), in the DAG's order."""
    logger = get_run_logger()
    selected = select_stages(stages, Path(root))
    logger.info("stages: %s", " -> ".join(selected))
    params = load_params(Path(root) / "params.yaml")
    tracker = Tracker(params.tracking, Path(root))
    tracker.start("flow", {"flow": {"stages": ",".join(selected), "force": force}})
    env = {PARENT_RUN_ENV: tracker.run_id} if tracker.run_id else {}
    results: dict = {}
    status = "FAILED"
    started = time.perf_counter()
    try:
        runner = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        for stage in selected:
            results[stage] = runner(stage, root, env, force)
        status = "FINISHED"
    finally:  # children a killed stage left RUNNING end KILLED; a flow where no stage ran leaves no run
        tracker.finish_parent(
            status,
            {
                "stages_selected": len(selected),
                "stages_done": len(results),
                "wall_time_s": round(time.perf_counter() - started, 2),
            },
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=mimflow_pipeline.__doc__)
    parser.add_argument("stages", nargs="*", help="stages to run (default: all, in DAG order)")
    parser.add_argument("--force", action="store_true", help="re-run stages even when DVC says they are up to date")
    parser.add_argument("--retries", type=int, default=1)
    args = parser.parse_args()
    try:  # what is wrong before anything runs is one line, not a flow run's traceback
        select_stages(args.stages or None)
        params = load_params(ROOT / "params.yaml")
        if params.tracking.enabled:
            check_reachable(resolve_uri(params.tracking, ROOT), params.tracking.connect_timeout_s)
    except (ParamsError, ValueError, TrackingError) as e:
        print(f"error: flow: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ParamsError) else 1)  # the stages' exit codes
    mimflow_pipeline(stages=args.stages or None, force=args.force, retries=args.retries)


if __name__ == "__main__":
    main()
