"""MLflow tracking: one run per stage execution in the project's experiment.

The default store is ``sqlite:///mlflow.db`` at the project root (no server needed); the
``MLFLOW_TRACKING_URI`` environment variable, then ``tracking.uri`` in params.yaml, override it.
A run gets the stage's params section (flattened), per-step metrics, final metrics, figures and tags:
stage, variant, git commit, and the hashes of the stage's dependencies as recorded in dvc.lock.
Under the Prefect flow, ``MIMFLOW_PARENT_RUN_ID`` nests each stage's run under the flow's run.

An HTTP tracking server that cannot be reached is an error before any training starts
(:class:`TrackingError`): a stage never trains for an hour and then loses its record.
"""
from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Tracking

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MIMFLOW_PARENT_RUN_ID"


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
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
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

    def start(self, stage: str, params: dict, tags: dict[str, str] | None = None) -> None:
        if not self.enabled:
            return
        uri = resolve_uri(self.cfg, self.root)
        check_reachable(uri, self.cfg.connect_timeout_s)
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.set_experiment(self.cfg.experiment)
        except Exception as e:  # noqa: BLE001 (MLflow raises many kinds)
            raise TrackingError(f"MLflow at {uri}: cannot open experiment {self.cfg.experiment!r} ({str(e).splitlines()[0]})") from None
        all_tags = {"stage": stage.split("@")[0], "mimflow.stage": stage, **dependency_hashes(self.root, stage), **(tags or {})}
        if os.environ.get("DVC_EXP_NAME"):
            all_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]  # groups the stages of one `dvc exp run`
        commit = git_commit(self.root)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        parent = os.environ.get(PARENT_RUN_ENV)
        run = mlflow.start_run(run_name=stage, tags=all_tags, parent_run_id=parent or None)
        self.run_id = run.info.run_id
        flat = {k: ("None" if v is None else v) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, stage, self.cfg.experiment, uri)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._mlflow is None:
            return
        clean = {k.replace("@", "_"): float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, path: str | Path) -> None:
        self.log_artifact(path, "figures")

    def log_model(self, model, name: str, input_example=None, registered_name: str | None = None, alias: bool = False,
                  serialization_format: str | None = None) -> None:
        """Log a PyTorch model (with a signature inferred from ``input_example``) and register it;
        ``alias`` puts the registry alias (tracking.registry_alias) on this version. ``serialization_format``
        "pickle" logs models torch.export cannot trace (detectors: lists of images in, lists of dicts out);
        None is MLflow's default ("pt2", which needs ``input_example``)."""
        if self._mlflow is None or not self.cfg.log_models:
            return
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
        info = mlflow.pytorch.log_model(model, name=name, signature=signature, input_example=input_example,
                                        registered_model_name=registered_name, pip_requirements=model_requirements(),
                                        serialization_format=serialization_format)
        if registered_name and alias:
            client = self._mlflow.MlflowClient()
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                client.set_registered_model_alias(registered_name, self.cfg.registry_alias, str(version))

    def alias_metric(self, registered_name: str, metric: str) -> float | None:
        """``metric`` of the run whose model version holds the registry alias; None when tracking or model
        logging is off, or there is no such model, alias, run or metric (the caller's run is then the best)."""
        if self._mlflow is None or not self.cfg.log_models:
            return None
        from mlflow.exceptions import MlflowException

        client = self._mlflow.MlflowClient()
        try:
            version = client.get_model_version_by_alias(registered_name, self.cfg.registry_alias)
            return client.get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
        except MlflowException:
            return None

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
