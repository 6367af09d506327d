"""What every stage module shares: the entry point and the stage context.

``run_stage(name, body)`` parses ``--params`` (and the matrix item), validates params.yaml, sets up
logging, seeds, threads, device and torchrun/DDP, opens the stage's MLflow run, calls ``body(ctx)``,
writes the returned metrics atomically (the numbers to ``metrics/<stage>.json``, timings and strings to
``runs/<stage>.json``: pipelines/results.py) and logs them. Bad input ends in
one line on stderr naming the file or key and a non-zero exit (set ``MIMFLOW_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.io import file_digest
from components.training.distributed import DistInfo, cleanup_distributed, init_distributed
from components.training.engine import NonFiniteLossError, mark_finished
from pipelines import layout
from pipelines.config import Params, ParamsError, load_params
from pipelines.results import write_results
from pipelines.tracking import Tracker, TrackingError, upstream_params

log = logging.getLogger("mimflow")

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _k, _v in TELEMETRY_OFF.items():
    os.environ.setdefault(_k, _v)

# Exit codes: 2 for params, 1 for anything else a user can fix (data, checkpoints, tracking, NaN).
EXIT_PARAMS, EXIT_INPUT = 2, 1


@dataclass
class StageContext:
    """What a stage body gets: validated params, device, precision, rank, tracker and output paths."""

    name: str
    params: Params
    device: torch.device
    precision: str
    info: DistInfo
    tracker: Tracker
    variant: str | None = None  # DVC's matrix key: ``mae-0`` (init mae, seed 0), ``softteacher-10-1``
    item: str | None = None  # the variant without its seed: ``mae``, ``softteacher-10``
    run_seed: int | None = None  # a seeded stage's seed (one of its section's ``seeds``)
    root: Path = field(default_factory=Path.cwd)
    started: float = field(default_factory=time.perf_counter)

    @property
    def section(self) -> Any:
        return getattr(self.params, self.name)

    @property
    def seed(self) -> int:
        """The seed of everything random in this run: a seeded stage's own, else runtime.seed."""
        return self.run_seed if self.run_seed is not None else self.params.runtime.seed

    @property
    def num_workers(self) -> int:
        return self.params.runtime.num_workers

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def stage_id(self) -> str:
        """DVC's name for this stage: ``finetune@mae`` for a matrix item."""
        return f"{self.name}@{self.variant}" if self.variant else self.name

    @property
    def models_dir(self) -> Path:
        return self.root / layout.stage_dir(layout.MODELS, self.name, self.variant)

    @property
    def plots_dir(self) -> Path:
        return self.root / layout.stage_dir(layout.PLOTS, self.name, self.variant)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / layout.stage_dir(layout.CHECKPOINTS, self.name, self.variant)

    @property
    def metrics_path(self) -> Path:
        return self.root / layout.metrics_file(self.name, self.variant)

    def fingerprint(self, *inputs: Any) -> str:
        """Hash of everything that decides this stage's result: its section, the runtime seed, precision
        and process count, the project's code (components/ and pipelines/), and ``inputs``: paths are
        hashed by content (a directory by every file in it), anything else by its text.

        A checkpoint written under another fingerprint is never resumed, so a finished run is never
        taken for the result of changed data or code. Images that a dataset's index points to outside
        ``data/`` count through the content hash the index records for each."""
        blob = json.dumps(
            [
                self.name,
                self.variant,
                self.section.model_dump(mode="json"),
                self.seed,
                self.precision,
                self.info.world_size,
                code_digest(),
                *(file_digest(x) if isinstance(x, Path) else str(x) for x in inputs),
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def log_figure(self, path: Path) -> None:
        if self.is_main:
            self.tracker.log_figure(path)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.is_main:
            self.tracker.log_metrics(metrics, step)

    def log_encoder(self, encoder: torch.nn.Module, images: torch.Tensor) -> None:
        """Log a pretrained encoder as the run's MLflow model, with the signature images [N, C, H, W] ->
        [CLS] features [N, D] taken from two of ``images``, so a pretraining run's model is browsable as a
        fine-tuning run's is (not registered: no metric of its own ranks encoders)."""
        if self.is_main and self.tracker.enabled and self.params.tracking.log_models:
            t = time.perf_counter()
            model = copy.deepcopy(encoder).float().cpu().eval()
            self.tracker.log_model(model, name="encoder", input_example=images[:2].float().cpu())
            log.info("%s: logged the encoder to MLflow in %.1f s", self.stage_id, time.perf_counter() - t)


def declared_root(project: Path, value: str | None) -> Path | None:
    """A data root as params declare it (``prepare.classification.root``, ``prepare.detection.*_images``):
    ``~`` expanded, a relative path taken from the project's root."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else project / path


def classification_index(ctx: StageContext):
    """The prepared classification index, its external images resolved against ``prepare.classification.root``
    (the index stores paths relative to it, so the data folder may move between runs and machines)."""
    from components.data.sources import load_classification_index

    return load_classification_index(
        ctx.root / layout.CLASSIFICATION_INDEX, root=declared_root(ctx.root, ctx.params.prepare.classification.root)
    )


def code_digest() -> str:
    """Digest of the project's Python code: every module of the components and pipelines packages."""
    import components
    import pipelines

    return file_digest(*(Path(pkg.__file__).parent for pkg in (components, pipelines)), suffix=".py")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ParamsError(
            f"runtime.precision = 'fp16': needs a CUDA device (running on {device.type}); use fp32 or bf16"
        )
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def hardware(device: torch.device) -> dict[str, str]:
    """What a run's numbers were computed on, for its runs/<stage>.json and MLflow params: the same params and
    seed give the same numbers on one kind of machine, while two x86 CPUs whose kernels use different vector
    units (``cpu_capability``: AVX2, AVX512) sum floats in different orders (docs/findings.md, Reproducing)."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _section_params(params: Params, name: str) -> dict:
    """The params an MLflow run records: the stage's own section (a stage without one, like baselines,
    reads others') and runtime."""
    own = {name: getattr(params, name).model_dump(mode="json")} if name in Params.model_fields else {}
    return {**own, "runtime": params.runtime.model_dump(mode="json")}


def run_stage(
    name: str,
    body: Callable[[StageContext], dict],
    variant_arg: str | None = None,
    variants: tuple[str, ...] = (),
    seeded: bool = False,
) -> None:
    """Command-line entry point of a stage:
    ``python -m pipelines.<name> [--params FILE] [--<variant_arg> X] [--seed N]``.

    A seeded stage (``seeded``) runs once per seed of its section's ``seeds``; ``--seed`` picks one
    (default: the first) and the run's name, outputs and MLflow tags carry it."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{name}",
        description=(body.__doc__ or "").strip().splitlines()[0] if body.__doc__ else None,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if variant_arg:
        parser.add_argument(f"--{variant_arg}", required=True, choices=variants or None)
    if seeded:
        parser.add_argument("--seed", type=int, default=None, help=f"one of {name}.seeds (default: the first)")
    args = parser.parse_args()
    variant = getattr(args, variant_arg) if variant_arg else None
    # The millions of objects torch, torchvision and mlflow create at import are never garbage: frozen, the
    # collector skips them during the run and at exit (Python's shutdown collection took 1.5-2 s a stage).
    gc.freeze()
    code = main(name, body, Path(args.params), variant, seed=args.seed if seeded else None, seeded=seeded)
    gc.freeze()
    sys.exit(code)


def run_seed(params: Params, name: str, seed: int | None) -> int:
    """The seed a seeded stage runs with: ``seed`` when it is one of ``<name>.seeds``, the first of them when None."""
    seeds = list(getattr(params, name).seeds)
    if seed is None:
        return seeds[0]
    if seed not in seeds:
        raise ParamsError(f"--seed {seed}: not one of {name}.seeds = {seeds}")
    return seed


def main(
    name: str,
    body: Callable[[StageContext], dict],
    params_path: Path,
    variant: str | None = None,
    seed: int | None = None,
    seeded: bool = False,
) -> int:
    """Run a stage body; returns the process exit code."""
    info = DistInfo()
    setup_logging(True)
    debug = os.environ.get("MIMFLOW_DEBUG") == "1"
    item = variant
    stage_id = f"{name}@{variant}" if variant else name
    if seeded and seed is not None:
        stage_id = f"{stage_id}-{seed}" if variant else f"{name}@{seed}"
    tracker: Tracker | None = None
    try:
        params = load_params(params_path)
        if seeded:
            seed = run_seed(params, name, seed)
            variant = f"{item}-{seed}" if item else str(seed)
            stage_id = f"{name}@{variant}"
        info, device = init_distributed(params.runtime.device)
        setup_logging(info.is_main)
        precision = resolve_precision(params.runtime.precision, device)
        if params.runtime.threads:
            torch.set_num_threads(params.runtime.threads)
        seed_everything(seed if seeded else params.runtime.seed)
        root = Path.cwd()
        tracker = Tracker(params.tracking, root, enabled=info.is_main)
        upstream = upstream_params(root, stage_id, params) if tracker.enabled else {}
        tags = {"variant": variant} if variant else {}
        if seeded:
            tags.update(seed=str(seed), item=item or "")
        tracker.start(stage_id, _section_params(params, name), tags=tags or None, upstream=upstream)
        ctx = StageContext(
            name=name,
            params=params,
            device=device,
            precision=precision,
            info=info,
            tracker=tracker,
            variant=variant,
            item=item,
            run_seed=seed if seeded else None,
            root=root,
        )
        log.info("%s on %s (%s), %d process(es), seed %d", stage_id, device, precision, info.world_size, ctx.seed)
        metrics = body(ctx) or {}
        if info.is_main:
            metrics = {**metrics, **hardware(device), "wall_time_s": round(time.perf_counter() - ctx.started, 2)}
            write_results(ctx.metrics_path, metrics)  # numbers to metrics/, timings and strings to runs/
            tracker.log_results(metrics)
            if mark_finished(ctx.checkpoint_dir):  # its results are written: the next run trains afresh
                log.info("%s: checkpoint marked finished (a re-run, dvc repro --force, trains afresh)", stage_id)
            log.info("%s done: %s", stage_id, ctx.metrics_path)
        tracker.end("FINISHED")
        return 0
    except ParamsError as e:
        _fail(stage_id, e, debug, tracker)
        return EXIT_PARAMS
    except (ValueError, FileNotFoundError, NotADirectoryError, TrackingError, NonFiniteLossError, KeyError) as e:
        _fail(stage_id, e, debug, tracker)
        return EXIT_INPUT
    except Exception:  # a bug, not bad input: the traceback stays, and the MLflow run is not left FINISHED
        _end_run(tracker, "FAILED")
        raise
    except KeyboardInterrupt:
        if tracker:
            tracker.end("KILLED")
        log.error("%s interrupted; run it again to resume from its last checkpoint", stage_id)
        return 130
    finally:
        cleanup_distributed()


def _end_run(tracker: Tracker | None, status: str) -> None:
    if tracker is not None:
        try:
            tracker.end(status)
        except Exception:  # noqa: BLE001 (the original error matters more)
            pass


def _fail(stage_id: str, error: BaseException, debug: bool, tracker: Tracker | None) -> None:
    _end_run(tracker, "FAILED")
    if debug:
        raise error
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, KeyError):
        message = f"missing key {message}"
    print(f"error: {stage_id}: {message}", file=sys.stderr)
