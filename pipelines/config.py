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
class EncoderArch(Section):
    """A ViT encoder: a preset of ``components.models.vit.PRESETS``, optionally with dims overridden."""

    preset: str = "vit_micro_patch4_32"
    img_size: int | None = Field(None, ge=8, le=1024)
    patch_size: int | None = Field(None, ge=1, le=64)
    embed_dim: int | None = Field(None, ge=4, le=8192)
    depth: int | None = Field(None, ge=1, le=128)
    num_heads: int | None = Field(None, ge=1, le=128)
    mlp_ratio: float | None = Field(None, gt=0, le=16)

    @model_validator(mode="after")
    def _check(self):
        from components.models.vit import PRESETS

        if self.preset not in PRESETS:
            raise KeyValueError("preset", self.preset, f"unknown ViT preset; known: {', '.join(PRESETS)}")
        d = self.dims()
        if d["img_size"] % d["patch_size"]:
            key = "img_size" if self.img_size is not None or self.patch_size is None else "patch_size"
            raise KeyValueError(key, d[key], f"img_size {d['img_size']} must be divisible by patch_size {d['patch_size']}")
        if d["embed_dim"] % d["num_heads"]:
            raise KeyValueError("embed_dim", d["embed_dim"], f"must be divisible by num_heads ({d['num_heads']})")
        if d["embed_dim"] % 4:
            raise KeyValueError("embed_dim", d["embed_dim"], "must be divisible by 4 (2D sin-cos position embedding)")
        return self

    def dims(self) -> dict:
        from components.models.vit import PRESETS

        overrides = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        return {"mlp_ratio": 4.0, **PRESETS[self.preset], **overrides}

    def spec(self):
        """The ``ViTSpec`` these params describe."""
        from components.models.vit import ViTSpec

        return ViTSpec(**self.dims())


class PretrainMAE(Section):
    """MAE pretraining (He et al. 2021); the paper's recipe, scaled to the data at hand."""

    model: EncoderArch = EncoderArch()
    decoder_embed_dim: int = Field(64, ge=4, le=8192)
    decoder_depth: int = Field(2, ge=1, le=64)
    decoder_num_heads: int = Field(4, ge=1, le=128)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    epochs: int = Field(12, ge=1)
    warmup_epochs: float = Field(1, ge=0)
    batch_size: int = Field(128, ge=1)  # per process, per micro-batch
    effective_batch: int | None = Field(None, ge=1)  # batch_size x accumulation x processes; null: no accumulation
    base_lr: float = Field(1.5e-3, gt=0)  # lr = base_lr * effective_batch / 256
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(None, gt=0)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # input normalisation (ImageNet's)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    val_images: int | None = Field(None, ge=1)  # held-out images for the masked-patch loss (null: all)
    figure_images: int = Field(6, ge=1, le=64)
    ckpt_every: int = Field(200, ge=1)  # optimizer steps between checkpoints
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise KeyValueError("decoder_embed_dim", self.decoder_embed_dim, f"must be divisible by decoder_num_heads ({self.decoder_num_heads})")
        if self.decoder_embed_dim % 4:
            raise KeyValueError("decoder_embed_dim", self.decoder_embed_dim, "must be divisible by 4 (2D sin-cos position embedding)")
        if self.warmup_epochs > self.epochs:
            raise KeyValueError("warmup_epochs", self.warmup_epochs, f"must be <= epochs ({self.epochs})")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise KeyValueError("crop_scale", list(self.crop_scale), "must be [min, max] with 0 < min <= max <= 1")
        if not all(0 <= b < 1 for b in self.betas):
            raise KeyValueError("betas", list(self.betas), "each beta must be in [0, 1)")
        if not all(s > 0 for s in self.std):
            raise KeyValueError("std", list(self.std), "must be positive")
        if self.effective_batch is not None and self.effective_batch % self.batch_size:
            raise KeyValueError("effective_batch", self.effective_batch, f"must be a multiple of batch_size ({self.batch_size})")
        return self


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
