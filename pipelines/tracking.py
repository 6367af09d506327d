"""MLflow tracking: one run per stage execution in the project's experiment.

The default store is ``sqlite:///mlflow.db`` at the project root (no server needed); the
``MLFLOW_TRACKING_URI`` environment variable, then ``tracking.uri`` in params.yaml, override it.
A run is named ``<stage> · <dvc exp name or short commit>`` and gets the stage's params section (flattened)
and the sections of the stages upstream of it in dvc.yaml (``finetune@mae`` records ``pretrain_mae.*``),
per-step metrics on one step axis, the stage's results (numbers as metrics at the last step; constants of
the run such as steps, epochs, peak_lr, effective_batch, and strings, as params), figures as MLflow images
(``log_image`` with a key, so Compare lines them up across runs, and as files under ``figures/``) and tags:
stage, variant, git commit, the hashes of the stage's dependencies as recorded in dvc.lock, and the host
and process id that ran it. A run left RUNNING by a process that is gone (kill -9, a lost node) is set
KILLED when the same stage starts again on that host. Under the Prefect flow, ``MIMFLOW_PARENT_RUN_ID``
nests each stage's run under the flow's run; ``MIMFLOW_FLOW_RUN_ID`` (set by the experiment flow) becomes
the tag ``prefect.flow_run_id``, and a ``dvc exp run``'s ``DVC_EXP_NAME`` the tag ``dvc.exp_name``.

The experiment is created as a model-training experiment (MLflow 3's ``mlflow.experimentKind`` tag); the UI
still opens an experiment on its traces overview unless the address asks for the runs table
(``#/experiments/<id>?workflowType=machine_learning``, the address ``make mlflow-ui`` prints). A registered
model's alias (``tracking.registry_alias``) moves to a new version only when it is strictly better than the
version holding it and both were trained on the same data with the same params (tags ``mimflow.data`` and
``mimflow.params`` on the versions).

An HTTP tracking server that cannot be reached is an error before any training starts
(:class:`TrackingError`): a stage never trains for an hour and then loses its record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Tracking

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MIMFLOW_PARENT_RUN_ID"
FLOW_RUN_ENV = "MIMFLOW_FLOW_RUN_ID"  # the Prefect flow run that started the stage (pipelines/experiment.py)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3's UI: a training experiment
# Results that describe the run rather than measure it: logged as params, not as (flat) metric charts.
CONSTANTS = frozenset(
    {
        "steps",
        "epochs",
        "batch",
        "effective_batch",
        "peak_lr",
        "encoder_params_m",
        "params_m",
        "resumed_from_step",
        "labeled_images",
        "unlabeled_images",
        "val_images",
        "classes",
        "burn_in_steps",
        "percent",
        "fold",
        "seed",
        "images",
        "batches",
        "knn_chance",
    }
)


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message says which URI and why."""


def default_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def resolve_uri(cfg: Tracking, root: Path) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else the project's mlflow.db (also from the temporary
    workspace of a queued ``dvc exp run``, whose original root DVC passes as DVC_ROOT)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri or default_uri(Path(os.environ.get("DVC_ROOT") or root))


def check_reachable(uri: str, timeout: float) -> None:
    """Fail fast when an HTTP(S) tracking server does not answer its health endpoint."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the user's own server)
            if response.status >= 500:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {response.status}")
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise TrackingError(f"MLflow tracking server {uri} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, point MLFLOW_TRACKING_URI elsewhere, "
            "or set tracking.enabled: false"
        ) from None


def prepare_store(uri: str) -> None:
    """Ready a SQLite store for stages that log at once (the parallel flow, ``dvc exp run --queue -j N``): the
    database in WAL mode, so readers do not block the one writer and a writer waits (MLflow's busy timeout,
    20 s) instead of failing with "database is locked" (mlflow#4123). WAL is a property of the database
    file: set once, every later connection uses it. Other stores are left alone."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = Path(uri[len("sqlite:///") :].split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None


def dependency_hashes(root: Path, stage: str) -> dict[str, str]:
    """md5 of each dependency of ``stage`` as dvc.lock records it (outputs of upstream stages are current
    when this stage runs; code dependencies are covered by the git commit)."""
    lock_path = root / "dvc.lock"
    dvc_yaml = root / "dvc.yaml"
    if not lock_path.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    stages = lock.get("stages", {})
    outs = {o["path"]: o.get("md5") or o.get("hash") for s in stages.values() for o in s.get("outs", []) if "path" in o}
    deps = [d["path"] for d in stages.get(stage, {}).get("deps", []) if "path" in d]
    if not deps and dvc_yaml.is_file():
        base = stage.split("@")[0]
        spec = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(base, {})
        deps = [d for d in spec.get("deps", []) if isinstance(d, str) and "${" not in d]
    return {f"dvc.dep.{p}": str(outs[p]) for p in deps if outs.get(p)}


def upstream_params(root: Path, stage: str, params: Any) -> dict[str, Any]:
    """The params sections of every stage upstream of ``stage`` in dvc.yaml's DAG (DVC's own graph),
    other than ``runtime`` and the stage's own: ``{"pretrain_mae": {...}, "prepare": {...}}`` for
    ``finetune@mae``. Empty outside a DVC project or when ``stage`` is not one of its stages."""
    try:
        import networkx as nx
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            graph = repo.index.graph  # edges point from a stage to its dependencies
            node = next((s for s in graph.nodes if getattr(s, "name", None) == stage), None)
            if node is None:
                return {}
            upstream = nx.descendants(graph, node)
            keys = {str(k).split(".")[0] for s in upstream for d in s.deps for k in (getattr(d, "params", None) or [])}
    except Exception as e:  # noqa: BLE001 (no DVC repo, a dvc.yaml DVC refuses: the run is still worth logging)
        log.debug("no upstream params for %s: %s", stage, e)
        return {}
    own = stage.split("@")[0]
    sections = sorted(keys - {own, "runtime"})
    return {k: getattr(params, k).model_dump(mode="json") for k in sections if hasattr(params, k)}


def digest(obj: Any) -> str:
    """A short SHA-256 of ``obj``'s JSON (params compared across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def model_requirements() -> list[str]:
    """``name==version`` of the packages a logged classifier or detector needs to load and run."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "torchvision", "timm"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


class Tracker:
    """A thin wrapper over one MLflow run; every method is a no-op when tracking is off or on ranks > 0."""

    def __init__(self, cfg: Tracking, root: Path, enabled: bool = True):
        self.cfg, self.root = cfg, root
        self.enabled = enabled and cfg.enabled
        self.run_id: str | None = None
        self._mlflow = None
        self.last_step = 0  # the largest step logged: the run's results are logged there
        self.params_digest = ""

    def start(self, stage: str, params: dict, tags: dict[str, str] | None = None, upstream: dict | None = None) -> None:
        """Open the stage's run: ``params`` are its own sections, ``upstream`` the sections of the stages
        it depends on (:func:`upstream_params`); both are logged, and both decide which registered model
        versions it is compared with (:meth:`log_model`)."""
        self.params_digest = digest({k: v for k, v in {**(upstream or {}), **params}.items() if k != "runtime"})
        if not self.enabled:
            return
        uri = resolve_uri(self.cfg, self.root)
        check_reachable(uri, self.cfg.connect_timeout_s)
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.set_experiment(self.cfg.experiment)
            if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        except Exception as e:  # noqa: BLE001 (MLflow raises many kinds)
            raise TrackingError(
                f"MLflow at {uri}: cannot open experiment {self.cfg.experiment!r} ({str(e).splitlines()[0]})"
            ) from None
        self.close_stale_runs(experiment.experiment_id, stage)
        all_tags = {
            "stage": stage.split("@")[0],
            "mimflow.stage": stage,
            **dependency_hashes(self.root, stage),
            **(tags or {}),
            "mimflow.host": socket.gethostname(),
            "mimflow.pid": str(os.getpid()),
        }
        exp_name = os.environ.get("DVC_EXP_NAME")
        if exp_name:
            all_tags["dvc.exp_name"] = exp_name  # groups the stages of one `dvc exp run`
        flow_run = os.environ.get(FLOW_RUN_ENV)
        if flow_run:
            all_tags["prefect.flow_run_id"] = flow_run
        commit = git_commit(self.root)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        label = exp_name or (commit[:7] if commit else None)
        parent = os.environ.get(PARENT_RUN_ENV)
        name = f"{stage} · {label}" if label else stage
        run = mlflow.start_run(run_name=name, tags=all_tags, parent_run_id=parent or None)
        self.run_id = run.info.run_id
        self.log_params({**(upstream or {}), **params})
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, run.info.run_name, self.cfg.experiment, uri)

    def close_stale_runs(self, experiment_id: str, stage: str) -> list[str]:
        """Set KILLED the runs of ``stage`` still RUNNING whose process on this host is gone (kill -9, OOM
        killer: nothing in the process could end its run); returns their ids. Runs started on other hosts
        are left alone (their process cannot be checked from here)."""
        client = self._mlflow.MlflowClient()
        host, closed = socket.gethostname(), []
        query = f"tags.`mimflow.stage` = '{stage}' and attributes.status = 'RUNNING'"
        runs = client.search_runs([experiment_id], query, max_results=100)
        for run in runs:
            tags = run.data.tags
            pid = tags.get("mimflow.pid", "")
            if tags.get("mimflow.host") == host and pid.isdigit() and not process_alive(int(pid)):
                client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
        if closed:
            log.info(
                "MLflow: set KILLED %d run(s) of %s whose process is gone: %s", len(closed), stage, ", ".join(closed)
            )
        return closed

    def log_params(self, params: dict) -> None:
        """Log (nested) params, flattened to dotted keys; None becomes "None"."""
        if self._mlflow is None:
            return
        items = [(k.replace("@", "_"), "None" if v is None else v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._mlflow is None:
            return
        clean = {
            k.replace("@", "_"): float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if clean:
            self._mlflow.log_metrics(clean, step=step)
            self.last_step = max(self.last_step, step or 0)

    def log_results(self, results: dict[str, Any]) -> None:
        """A stage's results (its metrics file): numbers as metrics at the run's last step, so each
        series has one axis and the runs table shows the result; constants of the run (:data:`CONSTANTS`),
        strings, booleans and None as params. Lists are left to the metrics file."""
        if self._mlflow is None:
            return
        flat = flatten(results)
        numbers = {
            k: v
            for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.split(".")[-1] not in CONSTANTS
        }
        described = {k: v for k, v in flat.items() if k not in numbers and not isinstance(v, (list, tuple))}
        self.log_params(described)
        self.log_metrics(numbers, step=self.last_step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, path: str | Path) -> None:
        """A PNG as an MLflow image keyed by its file name at the run's last step (the UI's Compare and
        image charts line up images of the same key across runs), and as the file under ``figures/``."""
        if self._mlflow is None or not Path(path).is_file():
            return
        self.log_artifact(path, "figures")
        from PIL import Image

        with Image.open(path) as image:
            self._mlflow.MlflowClient().log_image(
                self.run_id, image.convert("RGB"), key=Path(path).stem, step=self.last_step, synchronous=True
            )

    def log_model(
        self,
        model,
        name: str,
        input_example=None,
        registered_name: str | None = None,
        score: tuple[str, float] | None = None,
        data: str = "",
        serialization_format: str | None = None,
    ) -> bool:
        """Log a PyTorch model (with a signature inferred from ``input_example``) and, with ``registered_name``,
        register it; returns whether the registry alias (tracking.registry_alias) now points to this version.
        The version is tagged with ``data`` (a digest of the data it was trained on) and the run's params
        digest; ``score`` = (metric, value) moves the alias here only when no version holds it, or the holder
        has the same data and params tags and a strictly lower value of the run's metric (ties and other data
        or params keep it). ``serialization_format`` "pickle" logs models torch.export cannot trace (detectors:
        lists of images in, lists of dicts out); None is MLflow's default ("pt2", which needs ``input_example``)."""
        if self._mlflow is None or not self.cfg.log_models:
            return False
        import mlflow.pytorch
        from mlflow.models import infer_signature

        signature = None
        if input_example is not None:
            import torch

            with torch.no_grad():
                out = model(input_example)
            signature = infer_signature(input_example.cpu().numpy(), out.detach().cpu().numpy())
            input_example = input_example.cpu().numpy()
        # Pinned from the running environment: MLflow's own requirement inference costs ~20 s per model.
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=signature,
            input_example=input_example,
            registered_model_name=registered_name,
            pip_requirements=model_requirements(),
            serialization_format=serialization_format,
        )
        version = getattr(info, "registered_model_version", None)
        if not registered_name or version is None:
            return False
        client = self._mlflow.MlflowClient()
        lineage = {"mimflow.data": data, "mimflow.params": self.params_digest}
        for key, value in lineage.items():
            client.set_model_version_tag(registered_name, str(version), key, value)
        move, why = self._alias_decision(client, registered_name, lineage, score)
        if move:
            client.set_registered_model_alias(registered_name, self.cfg.registry_alias, str(version))
        log.info(
            "registered %s version %s; alias %r %s",
            registered_name,
            version,
            self.cfg.registry_alias,
            f"moved ({why})" if move else f"kept ({why})",
        )
        return move

    def _alias_decision(
        self, client, registered_name: str, lineage: dict, score: tuple[str, float] | None
    ) -> tuple[bool, str]:
        from mlflow.exceptions import MlflowException

        try:
            holder = client.get_model_version_by_alias(registered_name, self.cfg.registry_alias)
        except MlflowException:
            return True, "no version held it"
        if any(holder.tags.get(k) != v for k, v in lineage.items()):
            return False, f"version {holder.version} holds it, trained on other data or params"
        if score is None:
            return False, "no metric to compare"
        metric, value = score
        try:
            previous = client.get_run(holder.run_id).data.metrics.get(metric) if holder.run_id else None
        except MlflowException:
            previous = None
        if previous is None:
            return True, f"version {holder.version} has no {metric}"
        if value > previous:
            return True, f"{metric} {value:.4g} > {previous:.4g} of version {holder.version}"
        return False, f"{metric} {value:.4g} <= {previous:.4g} of version {holder.version}"

    def close_children(self, status: str = "KILLED") -> dict[str, int]:
        """For the flow's run: set ``status`` on its child runs still RUNNING (their stage process is gone:
        the flow waits for each) and return how many children ended in each status (after that)."""
        if self._mlflow is None or self.run_id is None:
            return {}
        client = self._mlflow.MlflowClient()
        experiment_id = client.get_run(self.run_id).info.experiment_id
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=1000)
        counts: dict[str, int] = {}
        for child in children:
            state = child.info.status
            if state == "RUNNING":
                client.set_terminated(child.info.run_id, status)
                state = status
            counts[state] = counts.get(state, 0) + 1
        return counts

    def finish_parent(self, status: str, summary: dict[str, Any]) -> None:
        """End the flow's run: children left RUNNING are set KILLED; with no child at all (every stage was
        up to date, or none started) the run is deleted rather than left empty in the runs list; otherwise
        ``summary`` and the children's counts by status are logged on it."""
        if self._mlflow is None:
            return
        counts = self.close_children("KILLED")
        if not counts:
            run_id = self.run_id
            self.end(status)
            self._delete(run_id)
            log.info("MLflow: no stage ran under flow run %s; deleted it", run_id)
            return
        self.log_metrics({**summary, **{f"stages_{k.lower()}": v for k, v in counts.items()}})
        self.end(status)

    def _delete(self, run_id: str | None) -> None:
        import mlflow

        if run_id:
            mlflow.MlflowClient().delete_run(run_id)

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
