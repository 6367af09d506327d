"""Where the stages' files live and what they are called: the one place for the project's layout.

dvc.yaml declares the same paths and matrix lists (``tests/pipelines/test_layout.py`` checks they agree);
a stage module takes them from here instead of spelling them out. Paths are relative to the project's root
(a stage joins them to ``ctx.root``). The one figure writer of every stage, :func:`write_figure`, is here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.data.sources import DataError
from components.io import atomic_write

if TYPE_CHECKING:
    from pipelines.common import StageContext

# --------------------------------------------------------------------------------------------- data
SOURCES = Path("datasets")  # external datasets (`dvc add datasets/<name>`), a dependency of prepare in dvc.yaml
DATA = Path("data")
CLASSIFICATION = DATA / "classification"  # index.json, images, splits/labeled_<pct>_fold<k>.json
CLASSIFICATION_INDEX = CLASSIFICATION / "index.json"
DETECTION = DATA / "detection"  # train.json, val.json, images, splits/<pct>_fold<k>/{labeled,unlabeled}.json

# ---------------------------------------------------------------------------------- stage outputs
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")

# ------------------------------------------------------------------------------ the matrix lists
INITS = ("scratch", "mae", "ibot", "cnn")  # finetune@<init>-<seed>
METHODS = ("supervised", "softteacher")  # detect@<method>-<percent>-<seed>
ENCODER_DIRS = {"mae": MODELS / "pretrain_mae", "ibot": MODELS / "pretrain_ibot"}  # pretrained ViT encoders
FINETUNE_MODELS = MODELS / "finetune"


def stage_dir(kind: Path, stage: str, variant: str | None = None) -> Path:
    """``<kind>/<stage>`` or, for a matrix item, ``<kind>/<stage>/<variant>`` (kind: MODELS, CHECKPOINTS, PLOTS)."""
    d = kind / stage
    return d / variant if variant else d


def metrics_file(stage: str, variant: str | None = None) -> Path:
    """``metrics/<stage>.json`` or, for a matrix item, ``metrics/<stage>/<variant>.json``."""
    return METRICS / stage / f"{variant}.json" if variant else METRICS / f"{stage}.json"


def finetuned_dir(init: str, seed: int) -> Path:
    """The fine-tuned classifier of ``finetune@<init>-<seed>``."""
    return FINETUNE_MODELS / f"{init}-{seed}"


# ------------------------------------------------------------------------------------------ splits
def pct_name(percent: float) -> str:
    """10.0 -> '10', 0.5 -> '0.5': a labeled percent as split files and directories name it."""
    return f"{percent:g}"


def labeled_split_name(percent: float, fold: int) -> str:
    """``splits/labeled_<pct>_fold<k>.json``: a classification split, relative to its dataset's directory."""
    return f"splits/labeled_{pct_name(percent)}_fold{fold}.json"


def labeled_split_file(percent: float, fold: int) -> Path:
    """The classification split of ``percent`` and ``fold``:
    ``data/classification/splits/labeled_<pct>_fold<k>.json``."""
    return CLASSIFICATION / labeled_split_name(percent, fold)


def existing_labeled_split(ctx: StageContext, key: str, percent: float, fold: int) -> Path:
    """The classification split that params ``<key>.labeled_percent`` and ``<key>.fold`` name (relative to the
    project's root), or a one-line error naming the keys and the splits prepare writes."""
    path = labeled_split_file(percent, fold)
    if not (ctx.root / path).is_file():
        have = ctx.params.prepare.classification
        raise DataError(
            f"{ctx.root / path}: no labeled split for {key}.labeled_percent = {pct_name(percent)}, {key}.fold = "
            f"{fold} (prepare.classification.labeled_percents = {have.labeled_percents}, folds = {have.folds})"
        )
    return path


def detection_split_key(percent: float, fold: int) -> str:
    """``<pct>_fold<k>``: a detection split's name (its directory, its key in prepare's metrics)."""
    return f"{pct_name(percent)}_fold{fold}"


def detection_split_name(percent: float, fold: int) -> str:
    """``splits/<pct>_fold<k>``: a detection split's directory, relative to its dataset's directory."""
    return f"splits/{detection_split_key(percent, fold)}"


def detection_split_dir(percent: float, fold: int) -> Path:
    """The detection split of ``percent`` and ``fold``: ``data/detection/splits/<pct>_fold<k>/``."""
    return DETECTION / detection_split_name(percent, fold)


# ----------------------------------------------------------------------------------------- figures
def write_figure(fig: Any, path: str | os.PathLike, ctx: StageContext | None = None, dpi: int = 100) -> Path:
    """The one way a stage writes a figure: ``fig`` (a matplotlib Figure, or a PIL image such as a contact
    sheet) as a PNG at ``path`` atomically (temporary name, then rename), the matplotlib figure closed even
    when writing fails, and the file logged to the stage's MLflow run when ``ctx`` is given."""
    if hasattr(fig, "savefig"):
        import matplotlib.pyplot as plt

        try:
            path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
        finally:
            plt.close(fig)
    else:
        path = atomic_write(path, lambda tmp: fig.save(tmp, format="PNG"))
    if ctx is not None:
        ctx.log_figure(path)
    return path
