"""The params.yaml schema: one pydantic model per section, unknown keys forbidden.

``load_params`` validates the whole file (every stage checks every section, so a bad value anywhere
stops the DAG before anything trains) and turns validation errors into one line that names the file,
the key path, the bad value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message is one line naming the key."""


class KeyValueError(ValueError):
    """Raised by validators that check several fields: names the offending key inside the section."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Percent = float


# --------------------------------------------------------------------------- runtime, tracking
class Runtime(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0, le=64)
    threads: int | None = Field(None, ge=1, le=512)  # torch intra-op threads on CPU; None = torch's default
    compile: bool = False  # torch.compile the training model (GPU)
    progress: bool = True  # tqdm bars


class Tracking(Section):
    enabled: bool = True
    experiment: str = "mimflow"
    uri: str | None = None  # default sqlite:///mlflow.db at the project root; MLFLOW_TRACKING_URI overrides
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    log_models: bool = True
    registry_alias: str = "best"


# --------------------------------------------------------------------------- prepare
class ClassificationData(Section):
    source: Literal["shapes", "imagefolder", "cifar10"] = "shapes"
    root: str | None = None  # imagefolder: a directory with train/ and val/ class folders; cifar10: torchvision root
    download: bool = False  # cifar10 only: let torchvision download the archive
    image_size: int = Field(32, ge=8, le=1024)
    train_per_class: int = Field(600, ge=1)  # shapes only
    val_per_class: int = Field(100, ge=1)  # shapes only
    labeled_percents: list[Percent] = Field(default_factory=lambda: [10.0], min_length=1)
    folds: int = Field(1, ge=1, le=10)

    @model_validator(mode="after")
    def _check(self):
        if self.source != "shapes" and not self.root:
            raise KeyValueError("root", self.root, f"a directory is required when source is {self.source!r}")
        for p in self.labeled_percents:
            if not 0 < p <= 100:
                raise KeyValueError("labeled_percents", p, "each percent must be in (0, 100]")
        return self


class DetectionData(Section):
    source: Literal["shapes", "coco"] = "shapes"
    train_images: str | None = None  # coco: images directory and instances JSON of the training set
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    image_size: int = Field(128, ge=32, le=4096)  # shapes only
    num_train: int = Field(400, ge=2)  # shapes only
    num_val: int = Field(80, ge=1)  # shapes only
    min_objects: int = Field(2, ge=1)
    max_objects: int = Field(5, ge=1)
    labeled_percents: list[Percent] = Field(default_factory=lambda: [10.0], min_length=1)
    folds: int = Field(1, ge=1, le=10)

    @model_validator(mode="after")
    def _check(self):
        if self.min_objects > self.max_objects:
            raise KeyValueError("min_objects", self.min_objects, f"must be <= max_objects ({self.max_objects})")
        if self.source == "coco":
            for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
                if not getattr(self, key):
                    raise KeyValueError(key, None, "required when source is 'coco'")
        for p in self.labeled_percents:
            if not 0 < p <= 100:
                raise KeyValueError("labeled_percents", p, "each percent must be in (0, 100]")
        return self


class Prepare(Section):
    classification: ClassificationData = ClassificationData()
    detection: DetectionData = DetectionData()
    on_error: Literal["error", "skip"] = "error"  # bad images/annotations: stop, or skip and count them
    contact_sheet_samples: int = Field(16, ge=1, le=256)


# --------------------------------------------------------------------------- stages (owned by their stage modules)
class PretrainMAE(Section):
    pass


class PretrainIBOT(Section):
    pass


class Finetune(Section):
    pass


class Detect(Section):
    pass


class CKA(Section):
    """Minibatch CKA (Kornblith et al. 2019; Nguyen et al. 2021) between every layer of the MAE ViT,
    the iBOT ViT, one fine-tuned ViT and the CNN, on the held-out (val) images."""

    finetuned: Literal["scratch", "mae", "ibot"] = "mae"  # which finetune@<init> ViT is compared
    kernel: Literal["linear", "rbf"] = "linear"
    rbf_threshold: float = Field(1.0, gt=0)  # rbf: sigma = threshold * sqrt(median squared distance)
    debiased: bool = True  # unbiased HSIC (U-centering); false: the biased estimator
    pooling: Literal["mean", "cls", "flatten"] = "mean"  # ViT tokens / CNN maps -> one row per image
    vit_layers: list[str] = Field(default_factory=lambda: ["blocks.*"], min_length=1)  # names or globs (* = one name part)
    cnn_layers: list[str] = Field(default_factory=lambda: ["layer*.*"], min_length=1)
    batch_size: int = Field(256, ge=4)  # upper bound; the images are split into equal batches
    max_images: int | None = Field(None, ge=4)  # the first N held-out images (null: all)


class Report(Section):
    title: str = "mimflow results"


# --------------------------------------------------------------------------- the file
class Params(Section):
    runtime: Runtime = Runtime()
    tracking: Tracking = Tracking()
    prepare: Prepare = Prepare()
    pretrain_mae: PretrainMAE = PretrainMAE()
    pretrain_ibot: PretrainIBOT = PretrainIBOT()
    finetune: Finetune = Finetune()
    detect: Detect = Detect()
    cka: CKA = CKA()
    report: Report = Report()


def _describe(error: dict, source: str) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, KeyValueError):
        key = f"{loc}.{cause.key}" if loc else cause.key
        return f"{source}: {key} = {cause.value!r}: {cause.allowed}"
    if error["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key"
    value = error.get("input")
    msg = error["msg"].removeprefix("Value error, ")
    return f"{source}: {loc} = {value!r}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts, for 'unknown key' messages."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        line = _describe(first, source)
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, first["loc"])
            if allowed:
                line += f" (allowed: {', '.join(allowed)})"
        more = len(e.errors()) - 1
        raise ParamsError(line + (f" (+{more} more)" if more else "")) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return validate_params(raw, str(path))
