"""The Prefect flow: the DVC pipeline as a graph of Prefect tasks, with retries, logs, artifacts and one
parent MLflow run.

The graph is dvc.yaml's, read through DVC's own graph (``Repo.index.graph``), never a second hand-written
list: each stage is a Prefect task submitted with ``wait_for`` its upstream stages, so Prefect's graph has
dvc.yaml's edges. A stage task runs ``dvc repro`` and DVC decides what runs; the task reads DVC's own words
for what happened: a stage DVC found up to date ends ``Completed`` named ``Skipped`` with the message
"up to date", one restored from DVC's run-cache ends ``Completed`` named ``Cached``; neither republishes its
metrics artifact, only a stage that ran does. tqdm's bars (one log row per refresh once piped) become one
progress line per stage every :data:`PROGRESS_EVERY_S` seconds. Flow runs are named
``<commit short hash>-p<params digest>``.

Sequential (``parallel=1``, the default): one stage at a time in the project's workspace, ``dvc repro
--single-item <stage>``. Parallel (``parallel=N``): up to N stages whose upstream stages are done run at once,
each in its own workspace (a ``git worktree`` of HEAD plus the project's uncommitted changes, dvc.lock
included), which meet through a DVC remote: the stage's workspace runs ``dvc repro --pull <stage>`` (its
upstream stages restored from the remote's run-cache, the stage itself run, or restored when it is there) and
``dvc push --run-cache``. When all are done the project's workspace runs ``dvc repro --single-item`` of them,
and DVC restores every one from the run-cache without recomputing it (a stage DVC recomputed there is logged
and returned under ``recomputed``), leaving the dvc.lock a sequential run leaves. The remote is ``remote``
(a DVC remote of the project), else the project's default remote, else the project's own DVC cache directory
(the workspaces push straight into it; one machine only). A stage DVC cannot keep in its run-cache (an output
``persist: true``, or ``cache: false`` without being a metric or a plot), and any stage downstream of one, runs
in the project's workspace instead, one at a time. Before the stages start, a SQLite MLflow store is switched
to WAL (:func:`pipelines.tracking.prepare_store`) and its experiment is created by the flow's run, so concurrent
stages neither race to create it nor fail on "database is locked". A stage that fails stops new stages from
starting; the running ones finish (their results stay in the run-cache, so a rerun recomputes only what
failed) and the flow fails with the stage's one-line error.

Every stage's MLflow run is nested under the flow's run via ``MIMFLOW_PARENT_RUN_ID``; at the end the flow's
run records how many stages were selected and done and how its children ended (a child a killed stage left
RUNNING is set KILLED), and it is deleted when no stage ran (all up to date). When the report stage ran, the
claims table (``reports/claims.md``) becomes the Prefect artifact ``mimflow-claims`` and the flow's MLflow
run gets ``claims.md`` and a metric ``claim.<id>.<diff|ci_low|ci_high|n|verdict>`` per claim.

Run it with ``python -m pipelines.flow [--parallel N]`` (a temporary local Prefect server starts when no
``PREFECT_API_URL`` is set; its database lives in ``.prefect/`` inside the project).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
from prefect.states import Completed  # noqa: E402

from pipelines.config import ParamsError, load_params  # noqa: E402
from pipelines.tracking import (  # noqa: E402
    PARENT_RUN_ENV,
    Tracker,
    TrackingError,
    check_reachable,
    digest,
    git_commit,
    prepare_store,
    resolve_uri,
)

PROGRESS_EVERY_S = 30.0  # one progress line per stage at most this often in Prefect's log
LOCAL_REMOTE = "mimflow-parallel"  # the workspaces' remote when the project has none: its own DVC cache
_GIT_LOCK = threading.Lock()  # `git worktree add/remove` edit the project's .git: one at a time
_ROOT_LOCK = threading.Lock()  # one DVC command at a time in the project's workspace (DVC's repo lock)


class StageInputError(RuntimeError):
    """A stage stopped on bad input (its one-line ``error:`` message): running it again cannot help."""


@dataclass(frozen=True)
class StageNode:
    """One stage of dvc.yaml's DAG: its nearest upstream stages and whether DVC can keep it in its run-cache."""

    name: str
    upstream: tuple[str, ...]
    ancestors: frozenset[str]
    run_cacheable: bool  # DVC saves its runs in the run-cache (:func:`run_cacheable`)


def stage_graph(root: Path = ROOT) -> dict[str, StageNode]:
    """dvc.yaml's stages (``finetune@mae-0`` for matrix items) in an order that respects the DAG, ties broken
    by the order of dvc.yaml, each with the stages it directly depends on."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to its dependencies
        stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
        position = {s: i for i, s in enumerate(repo.index.stages)}
        ordered = list(
            nx.lexicographical_topological_sort(
                graph.reverse(copy=True).subgraph(stages), key=lambda s: f"{position.get(s, 0):06d}"
            )
        )
        names = {s: s.name for s in stages}
        ancestors = {s.name: frozenset(names[a] for a in nx.descendants(graph, s) if a in names) for s in ordered}
        cacheable = {s.name: run_cacheable(s) for s in ordered}
    return {
        name: StageNode(name, nearest(ancestors[name], ancestors), ancestors[name], cacheable[name])
        for name in (s.name for s in ordered)
    }


def run_cacheable(stage) -> bool:
    """Whether ``dvc repro`` saves the stage's runs in DVC's run-cache: not when an output is ``persist: true``
    (``dvc.stage.cache._can_hash``), nor when an output other than a metric or a plot is ``cache: false``
    (``Stage.reproduce``: "cache: false deactivates the run-cache", iterative/dvc#8738)."""
    outs = list(stage.outs)
    if not (stage.cmd and stage.deps and outs):
        return False
    return not any(o.persist or (not o.use_cache and not (o.is_metric or o.is_plot)) for o in outs)


def nearest(among: frozenset[str] | set[str], ancestors: dict[str, frozenset[str]]) -> tuple[str, ...]:
    """The stages of ``among`` that no other stage of ``among`` depends on through a chain (the transitive
    reduction: the edges Prefect's graph should draw)."""
    return tuple(sorted(a for a in among if not any(a in ancestors[b] for b in among)))


def stage_order(root: Path = ROOT) -> list[str]:
    """Stage names in an order that respects dvc.yaml's DAG, ties broken by the order of dvc.yaml."""
    return list(stage_graph(root))


def select_stages(stages: list[str] | None, root: Path = ROOT) -> list[str]:
    """``stages`` (all when None) in the DAG's order; an unknown name is a ValueError listing the known."""
    order = stage_order(root)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has: {', '.join(order)}")
    return [s for s in order if not stages or s in stages]


def upstream_edges(selected: list[str], graph: dict[str, StageNode]) -> dict[str, tuple[str, ...]]:
    """For each selected stage, the selected stages it waits for: its nearest selected ancestors (through
    stages left out of the selection too)."""
    chosen = set(selected)
    ancestors = {name: node.ancestors for name, node in graph.items()}
    return {s: nearest(graph[s].ancestors & chosen, ancestors) for s in selected}


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


# tqdm's default bar once piped: "desc:  50%|█████     | 2/4 [00:01<00:01,  1.50it/s, loss=0.1]"
TQDM_LINE = re.compile(r"^(?P<desc>.*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<rest>\d+/\d+.*)$")


# DVC's hint after every `dvc repro` that ran something (no config turns it off): once per flow is enough,
# and the README says when to push
DVC_HINTS = frozenset({"Use `dvc push` to send your updates to remote storage."})


class ProgressFilter:
    """tqdm's bars, one line per refresh once the stage's output is piped, as at most one short line per
    ``every_s`` seconds, plus the bar's last line (100 %): the other lines of the stage pass unchanged."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.last: float | None = None

    def __call__(self, line: str) -> str | None:
        m = TQDM_LINE.match(line.strip())
        if m is None:
            return line
        now = self.clock()
        if m["pct"] != "100" and self.last is not None and now - self.last < self.every_s:
            return None
        self.last = now
        return f"progress: {m['desc'].strip()} {m['pct']}% {m['rest'].strip()}"


def dvc_outcome(stage: str, lines: list[str]) -> str:
    """What DVC did with ``stage``, in its own words: "ran", "restored" (from the run-cache), "up to date"."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if f"Stage '{stage}' is cached - skipping run" in text:
        return "restored"
    if f"Stage '{stage}' didn't change, skipping" in text or f"Pulling data for stage: '{stage}'" in text:
        return "up to date"
    return "ran"


def run_logged(
    cmd: list[str], cwd: str | Path, env: dict[str, str], stage: str, logger, label: str | None = None
) -> list[str]:
    """Run ``cmd``, streaming its output (tqdm bars thinned) into Prefect's log; the output's lines.
    A stage's one-line bad-input message raises :class:`StageInputError`, any other failure RuntimeError."""
    bin_dir = Path(sys.executable).parent
    logger.info("$ %s", label or " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=str(cwd),
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    input_error = None
    progress = ProgressFilter()
    for line in proc.stdout:
        line = line.rstrip()
        if not line or line.strip() in DVC_HINTS:
            continue
        shown = progress(line)
        if shown is None:
            continue
        logger.info(shown)
        lines.append(shown)
        if line.startswith(f"error: {stage}: "):  # the stage's one-line message on bad input
            input_error = line
    if proc.wait() != 0:
        if input_error:
            raise StageInputError(f"stage {stage} stopped on bad input: {input_error}")
        last = [ln for ln in lines if not ln.startswith("progress: ")]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {last[-1] if last else ''}")
    return lines


def dvc(*args: str) -> list[str]:
    """A ``dvc`` command line with the flow's own DVC (dvc.yaml's ``python`` is then the flow's interpreter)."""
    return [str(Path(sys.executable).parent / "dvc"), *args]


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage that crashed (a lost node, an OOM kill), not one that
    stopped on bad input."""
    return not isinstance(state.data, StageInputError) and "StageInputError" not in (state.message or "")


# ----------------------------------------------------------------------------------------- workspaces
def git(root: str | Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=str(root), check=True, capture_output=True, text=True).stdout


def create_workspace(root: Path, base: Path, stage: str, remote: dict) -> Path:
    """A ``git worktree`` of HEAD under ``base`` with the project's uncommitted changes (modified and untracked,
    not ignored files: params.yaml, code, dvc.lock) and its local DVC config, whose default DVC remote is the
    flow's (``remote``: a remote's ``name``, and its ``url`` when the flow defines it)."""
    from configobj import ConfigObj

    base.mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_.-]", "_", stage) + "-", dir=base))
    with _GIT_LOCK:
        git(root, "worktree", "add", "--detach", "--quiet", str(ws), "HEAD")
    changed = git(root, "ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, changed):
        src = root / rel
        if src.is_file():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / rel)
    for rel in filter(None, git(root, "ls-files", "-z", "--deleted").split("\0")):
        (ws / rel).unlink(missing_ok=True)
    local = root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, ws / ".dvc" / "config.local")
    conf = ConfigObj(str(ws / ".dvc" / "config.local"))
    conf.setdefault("core", {})["remote"] = remote["name"]
    if remote.get("url"):
        conf[f'remote "{remote["name"]}"'] = {"url": remote["url"]}
    conf.write()
    return ws


# DVC 3's `dvc push --run-cache` sends a run-cache entry but not the objects of the outputs it lists as
# `cache: false` (metrics, plots), without which no other workspace can restore the stage from it: this sends
# both. Run in the workspace (DVC resolves the entries' paths from the working directory).
PUSH_RUN_CACHE = """
from dvc.repo import Repo
with Repo(".") as repo:
    entries = repo.stage_cache.push(None)
    objects = set().union(*repo.stage_cache.get_used_objs(entries).values()) if entries else set()
    result = repo.cloud.push(objects)
print(f"pushed {len(entries)} run-cache entries and {len(result.transferred)} objects")
if result.failed:
    raise SystemExit(f"error: push: {len(result.failed)} objects failed to upload")
"""


def remove_workspace(root: Path, ws: Path) -> None:
    with _GIT_LOCK:
        subprocess.run(["git", "worktree", "remove", "--force", str(ws)], cwd=root, capture_output=True)
    shutil.rmtree(ws, ignore_errors=True)


def parallel_remote(root: Path, remote: str | None) -> dict:
    """The DVC remote the workspaces meet through: ``remote``, else the project's default remote, else the
    project's own DVC cache directory (a local remote has a cache's layout, run-cache included)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if remote and remote not in repo.config["remote"]:
            known = ", ".join(repo.config["remote"]) or "none"
            raise ValueError(f"--remote {remote}: no such DVC remote (configured: {known})")
        name = remote or repo.config["core"].get("remote")
        if name:
            return {"name": name, "url": None, "pull": True}
        return {"name": LOCAL_REMOTE, "url": str(Path(repo.cache.legacy.path).resolve()), "pull": False}


# ----------------------------------------------------------------------------------------- tasks
@task(task_run_name="{stage}", retry_condition_fn=retry_unless_bad_input)
def run_dvc_stage(stage: str, root: str, env: dict[str, str], force: bool = False, placement: dict | None = None):
    """Run one DVC stage and end in DVC's verdict: Completed (ran: its metrics published as a Markdown
    artifact), Completed named Cached (restored from the run-cache) or Completed named Skipped ("up to date").

    ``placement`` None: ``dvc repro --single-item`` in the project. ``{"where": "workspace", ...}``: in a
    workspace of its own that pulls from and pushes to the flow's remote; ``{"where": "root", ...}``: in the
    project, its upstream stages restored first from the run-cache (``dvc repro <stage>``)."""
    logger = get_run_logger()
    ws = None
    try:
        if placement is None:
            cwd = Path(root)
            lines = run_logged(
                dvc("repro", "--single-item", stage, *(["--force"] if force else [])), cwd, env, stage, logger
            )
        elif placement["where"] == "root":  # upstream stages the workspaces ran are restored first
            cwd = Path(root)
            pull = ["--pull"] if placement["remote"]["pull"] else []
            with _ROOT_LOCK:
                cmd = dvc("repro", *pull, "--single-item", *placement["restore"], stage)
                lines = run_logged(cmd, cwd, env, stage, logger)
        else:
            ws = cwd = create_workspace(Path(root), Path(placement["base"]), stage, placement["remote"])
            logger.info("workspace %s (remote %s)", ws, placement["remote"]["url"] or placement["remote"]["name"])
            lines = run_logged(dvc("repro", "--pull", stage), cwd, env, stage, logger)
            outcome = dvc_outcome(stage, lines)
            if outcome != "up to date":
                run_logged(
                    [sys.executable, "-c", PUSH_RUN_CACHE], cwd, env, "push", logger, "dvc push --run-cache (+ objects)"
                )
        outcome = dvc_outcome(stage, lines)
        files = stage_metrics_files(stage, cwd)
        result = {
            "outcome": outcome,
            "metrics": {str(p.relative_to(cwd)): json.loads(p.read_text()) for p in files if p.is_file()},
        }
    finally:
        if ws is not None:
            remove_workspace(Path(root), ws)
    if outcome == "up to date":
        return Completed(name="Skipped", message="up to date (DVC: didn't change, skipping)", data=result)
    if outcome == "restored":
        return Completed(name="Cached", message="restored from DVC's run-cache, not recomputed", data=result)
    key = re.sub(r"[^a-z0-9-]", "-", stage.lower())
    markdown = metrics_markdown(stage, [cwd / p for p in result["metrics"]])
    create_markdown_artifact(key=f"{key}-metrics", markdown=markdown, description=f"metrics of {stage}")
    summary = cwd / "reports" / "summary.md"
    if stage == "report" and summary.is_file():
        create_markdown_artifact(
            key="mimflow-report", markdown=summary.read_text(), description="the results page (reports/index.html)"
        )
    return result


@task(task_run_name="restore {count} stages into the project")
def restore_into_project(stages: list[str], count: int, root: str, env: dict[str, str], pull: bool) -> dict:
    """``dvc repro --single-item`` of the stages the workspaces ran, in the project: DVC restores each from
    its run-cache (pulled from the flow's remote) and writes dvc.lock. Returns the stages DVC recomputed
    here instead (none when every workspace pushed its run-cache)."""
    logger = get_run_logger()
    with _ROOT_LOCK:
        lines = run_logged(dvc("repro", *(["--pull"] if pull else []), "--single-item", *stages), root, env, "", logger)
    recomputed = [s for s in stages if f"Running stage '{s}'" in "\n".join(lines)]
    if recomputed:
        logger.warning("DVC recomputed %s in the project: not in the run-cache", ", ".join(recomputed))
    return {"recomputed": recomputed, "restored": [s for s in stages if dvc_outcome(s, lines) == "restored"]}


def publish_claims(root: Path, tracker: Tracker) -> bool:
    """The report stage's claims table (``reports/claims.md``) as the Prefect Markdown artifact
    ``mimflow-claims``; on the flow's MLflow run the table as ``claims.md`` and each claim's numbers from
    ``metrics/claims.json`` as metrics ``claim.<id>.<field>`` (verdict 1 holds, 0 inside noise, -1 reversed).
    False when there is no claims table."""
    table = root / "reports" / "claims.md"
    if not table.is_file():
        return False
    create_markdown_artifact(
        key="mimflow-claims", markdown=table.read_text(), description="the claims over seeds (reports/claims.json)"
    )
    numbers = root / "metrics" / "claims.json"
    if numbers.is_file():
        claims = json.loads(numbers.read_text())
        tracker.log_metrics({f"claim.{cid}": values for cid, values in claims.items() if isinstance(values, dict)})
    tracker.log_artifact(table)
    return True


def flow_run_name() -> str:
    """``<commit short hash>-p<digest of params.yaml>`` (``+`` after the hash when tracked files differ from it)."""
    from prefect.runtime import flow_run

    return run_label(Path(flow_run.parameters.get("root") or ROOT))


def run_label(root: Path) -> str:
    import yaml

    commit = git_commit(root)
    short = commit[:7] if commit else "nogit"
    try:
        dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no").strip())
    except (subprocess.SubprocessError, OSError):
        dirty = False
    params = root / "params.yaml"
    data = yaml.safe_load(params.read_text()) if params.is_file() else {}
    return f"{short}{'+' if dirty else ''}-p{digest(data)[:8]}"


@flow(name="mimflow", log_prints=True, flow_run_name=flow_run_name)
def mimflow_pipeline(
    stages: list[str] | None = None,
    force: bool = False,
    retries: int = 1,
    retry_delay_seconds: int = 10,
    root: str = str(ROOT),
    parallel: int = 1,
    remote: str | None = None,
    workspaces: str | None = None,
) -> dict:
    """Run the DVC pipeline (all of it, or ``stages``) as Prefect tasks with dvc.yaml's edges; with
    ``parallel`` > 1, up to that many stages at once, each in its own workspace, meeting through a DVC remote."""
    logger = get_run_logger()
    project = Path(root)
    if parallel < 1:
        raise ValueError(f"parallel = {parallel}: must be >= 1")
    if parallel > 1 and force:
        raise ValueError("--force with --parallel: a forced stage's new result and its old one share a run-cache key")
    graph = stage_graph(project)
    selected = select_stages(stages, project)
    edges = upstream_edges(selected, graph)
    logger.info("stages: %s", ", ".join(f"{s} <- {'+'.join(edges[s]) or '-'}" for s in selected))
    params = load_params(project / "params.yaml")
    tracker = Tracker(params.tracking, project)
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if tracker.enabled:
        uri = resolve_uri(params.tracking, project)
        prepare_store(uri)
        env["MLFLOW_TRACKING_URI"] = uri  # the workspaces log where the project does
    tracker.start("flow", {"flow": {"stages": ",".join(selected), "force": force, "parallel": parallel}})
    if tracker.run_id:
        env[PARENT_RUN_ENV] = tracker.run_id
    placements: dict[str, dict | None] = dict.fromkeys(selected)
    base = None
    remote_spec = None
    if parallel > 1:
        remote_spec = parallel_remote(project, remote)
        base = Path(workspaces or tempfile.mkdtemp(prefix="mimflow-workspaces-"))
        in_root = {
            s for s, n in graph.items() if not n.run_cacheable or any(not graph[a].run_cacheable for a in n.ancestors)
        }
        for s in selected:
            where = "root" if s in in_root else "workspace"
            placements[s] = {"where": where, "base": str(base), "remote": remote_spec}
        if in_root & set(selected):
            logger.info(
                "in the project (not run-cacheable: persist outputs): %s", ", ".join(sorted(in_root & set(selected)))
            )
    results: dict = {}
    status = "FAILED"
    started = time.perf_counter()
    failure: BaseException | None = None
    restored: dict = {}
    try:
        if remote_spec and remote_spec["pull"]:  # the project's results, for the workspaces to restore
            run_logged(dvc("push"), project, env, "", logger)
            run_logged(
                [sys.executable, "-c", PUSH_RUN_CACHE], project, env, "", logger, "dvc push --run-cache (+ objects)"
            )
        runner = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        futures: dict = {}
        pending, running = list(selected), set()
        while pending or running:
            for s in list(pending):
                if failure is None and len(running) < parallel and all(u in results for u in edges[s]):
                    placement = placements[s]
                    if placement and placement["where"] == "root":
                        ran_elsewhere = [
                            a for a in results if a in graph[s].ancestors and placements[a]["where"] != "root"
                        ]
                        placement = {**placement, "restore": [a for a in selected if a in ran_elsewhere]}
                    wait_for = [futures[u] for u in edges[s]]
                    futures[s] = runner.submit(s, root, env, force, placement, wait_for=wait_for)
                    pending.remove(s)
                    running.add(s)
            if not running:
                break
            _wait_any([futures[s] for s in running])
            for s in [s for s in running if futures[s].state.is_final()]:
                running.remove(s)
                if futures[s].state.is_completed():
                    results[s] = futures[s].result()
                elif failure is None:
                    failure = futures[s].result(raise_on_failure=False)
                    logger.error("%s failed: %s; no new stage starts", s, failure)
        in_workspaces = [
            s
            for s in selected
            if s in results
            and placements[s]
            and placements[s]["where"] == "workspace"
            and results[s]["outcome"] != "up to date"
        ]
        if in_workspaces:
            restored = restore_into_project(
                in_workspaces,
                len(in_workspaces),
                root,
                env,
                bool(remote_spec["pull"]),
                wait_for=[futures[s] for s in in_workspaces],
            )
        if "report" in results and results["report"]["outcome"] != "up to date":
            publish_claims(project, tracker)
        if failure is not None:
            raise failure if isinstance(failure, Exception) else RuntimeError(str(failure))
        status = "FINISHED"
    finally:  # children a killed stage left RUNNING end KILLED; a flow where no stage ran leaves no run
        if base is not None and not workspaces:
            shutil.rmtree(base, ignore_errors=True)
        tracker.finish_parent(
            status,
            {
                "stages_selected": len(selected),
                "stages_done": len(results),
                "stages_ran": sum(r["outcome"] == "ran" for r in results.values()),
                "wall_time_s": round(time.perf_counter() - started, 2),
            },
        )
    out = {s: r["metrics"] for s, r in results.items()}
    if parallel > 1:
        out["recomputed"] = restored.get("recomputed", [])
    return out


def _wait_any(futures: list) -> None:
    """Block until one of ``futures`` reaches a final state."""
    while not any(f.state.is_final() for f in futures):
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=mimflow_pipeline.__doc__)
    parser.add_argument("stages", nargs="*", help="stages to run (default: all, in DAG order)")
    parser.add_argument("--force", action="store_true", help="re-run stages even when DVC says they are up to date")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="run up to N stages at once, each in its own workspace"
    )
    parser.add_argument("--remote", help="the DVC remote the workspaces share (default: the project's default)")
    args = parser.parse_args()
    try:  # what is wrong before anything runs is one line, not a flow run's traceback
        select_stages(args.stages or None)
        if args.parallel < 1:
            raise ValueError(f"--parallel {args.parallel}: must be >= 1")
        if args.parallel > 1 and args.force:
            raise ValueError("--force with --parallel: run forced stages sequentially")
        params = load_params(ROOT / "params.yaml")
        if params.tracking.enabled:
            check_reachable(resolve_uri(params.tracking, ROOT), params.tracking.connect_timeout_s)
        if args.parallel > 1:
            parallel_remote(ROOT, args.remote)
    except (ParamsError, ValueError, TrackingError) as e:
        print(f"error: flow: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ParamsError) else 1)  # the stages' exit codes
    mimflow_pipeline(
        stages=args.stages or None, force=args.force, retries=args.retries, parallel=args.parallel, remote=args.remote
    )


if __name__ == "__main__":
    main()
