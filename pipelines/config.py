"""The params.yaml schema: one pydantic model per section; params.yaml is the one source of values.

Rules every section follows (``Section``):
- every key is required: a missing section or key is an error naming it, so no value is taken
  silently from code (the only optional keys are a ViT preset's dimension overrides, where a missing
  key means "the preset's value");
- unknown keys are errors; types are strict (``epochs: true`` or ``epochs: "10"`` is not a number);
  every float is finite; every integer lies in [-(2**32 - 1), 2**32 - 1], the seed in [0, 2**32 - 1]
  (what ``numpy.random.seed`` accepts); YAML lists are read into the tuple-typed fields;
- ranges and cross-field rules (min_lr <= the peak lr, warm-up shorter than training, ...) are checked
  in each section's ``_check``; rules across sections (a stage's labeled split is one that prepare
  writes) in ``Params._check``.

``load_params`` reads the file safely (UTF-8 only, duplicate keys rejected with their line) and turns
every error into one line that names the file, the key path (or line and column), the bad value and what
is allowed. ``python -m pipelines.config [FILE]`` runs the same check (``make repro`` runs it before
``dvc repro``, whose own YAML parser would otherwise report a broken file in several lines); exit 2 on
an error.
"""

from __future__ import annotations

import functools
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

INT_LIMIT = 2**32 - 1  # every integer knob; also the largest seed numpy accepts
EXIT_PARAMS = 2


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message is one line naming the key."""


class KeyValueError(ValueError):
    """Raised by validators that check several fields: names the offending key inside the section."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


@functools.cache
def _tuple_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` typed as a tuple (alone or in a union with None)."""
    names = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        if any(typing.get_origin(a) is tuple for a in options):
            names.add(name)
    return frozenset(names)


def _check_ints(key: str, value: Any) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_LIMIT:
            raise KeyValueError(key, value, f"out of range: integers here are at most 2**32 - 1 = {INT_LIMIT}")


class Section(BaseModel):
    """One params section: strict types, finite floats, every key required, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _read_yaml_values(cls, data: Any) -> Any:
        """YAML has lists, not tuples: read a list into a tuple-typed field (its items stay strict), and
        stop integers too large for numpy and torch before they reach them."""
        if not isinstance(data, dict):
            return data
        tuples = _tuple_fields(cls)
        for key, value in data.items():
            _check_ints(key, value)
        return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()}


def check_peak_lr(min_lr: float, peak: float, how: str) -> None:
    """The cosine schedule decays from the peak lr down to min_lr: a min_lr above the peak inverts it."""
    if min_lr > peak:
        raise KeyValueError("min_lr", min_lr, f"must be <= the peak lr {peak:.3g} ({how}, one process)")


def check_warmup(key: str, warmup: float, total: float, total_key: str) -> None:
    if warmup >= total:
        raise KeyValueError(key, warmup, f"must be < {total_key} ({total}): the warm-up must end before training does")


Percent = float


def check_seeds(seeds: list[int]) -> list[int]:
    """A section's ``seeds``: the runs of a matrix stage, one per seed (dvc.yaml expands them)."""
    if not seeds:
        raise ValueError("must list at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError("must not repeat a seed")
    if any(not 0 <= s <= INT_LIMIT for s in seeds):
        raise ValueError(f"seeds must be in 0..{INT_LIMIT} (numpy seeds are 32-bit)")
    return seeds


# --------------------------------------------------------------------------- runtime, tracking
class Runtime(Section):
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = Field(ge=0, le=INT_LIMIT)  # numpy seeds are 32-bit
    num_workers: int = Field(ge=0, le=64)
    threads: int | None = Field(ge=1, le=512)  # torch intra-op threads on CPU; None = torch's default
    compile: bool  # torch.compile the training model (GPU)
    progress: bool  # tqdm bars
    launcher: str  # how dvc.yaml starts training stages, e.g. "torchrun --standalone --nproc-per-node=8"


class Tracking(Section):
    enabled: bool
    experiment: str
    uri: str | None  # default sqlite:///mlflow.db at the project root; MLFLOW_TRACKING_URI overrides
    connect_timeout_s: float = Field(gt=0, le=120)
    log_models: bool
    registry_alias: str = Field(pattern=r"^[\w\-]+$", max_length=255)  # MLflow's alias characters

    @model_validator(mode="after")
    def _check(self):
        if self.registry_alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.registry_alias):
            raise KeyValueError(
                "registry_alias", self.registry_alias, "is reserved by MLflow ('latest' and 'v<number>' name versions)"
            )
        return self


# --------------------------------------------------------------------------- prepare
def check_rotation(rotation: tuple[float, float]) -> None:
    lo, hi = rotation
    if not 0 <= lo <= hi <= 360:
        raise KeyValueError("rotation", list(rotation), "a range [lo, hi] of degrees with 0 <= lo <= hi <= 360")


class ClassificationData(Section):
    source: Literal["shapes", "imagefolder", "cifar10"]
    root: str | None  # imagefolder: a directory with train/ and val/ class folders; cifar10: torchvision root
    download: bool  # cifar10 only: let torchvision download the archive
    image_size: int = Field(ge=8, le=1024)
    train_per_class: int = Field(ge=1)  # shapes only
    val_per_class: int = Field(ge=1)  # shapes only
    rotation: tuple[float, float]  # shapes only: the shape's rotation range, degrees
    style: Literal["textured", "silhouette"]  # shapes only: components/data/shapes.py STYLES
    labeled_percents: list[Percent] = Field(min_length=1)
    folds: int = Field(ge=1, le=10)

    @model_validator(mode="after")
    def _check(self):
        if self.source != "shapes" and not self.root:
            raise KeyValueError("root", self.root, f"a directory is required when source is {self.source!r}")
        check_rotation(self.rotation)
        for p in self.labeled_percents:
            if not 0 < p <= 100:
                raise KeyValueError("labeled_percents", p, "each percent must be in (0, 100]")
        return self


class DetectionData(Section):
    source: Literal["shapes", "coco"]
    train_images: str | None  # coco: images directory and instances JSON of the training set
    train_annotations: str | None
    val_images: str | None
    val_annotations: str | None
    image_size: int = Field(ge=32, le=4096)  # shapes only
    num_train: int = Field(ge=2)  # shapes only
    num_val: int = Field(ge=1)  # shapes only
    min_objects: int = Field(ge=1)
    max_objects: int = Field(ge=1)
    rotation: tuple[float, float]  # shapes only: each shape's rotation range, degrees
    labeled_percents: list[Percent] = Field(min_length=1)
    folds: int = Field(ge=1, le=10)

    @model_validator(mode="after")
    def _check(self):
        check_rotation(self.rotation)
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
    classification: ClassificationData
    detection: DetectionData
    on_error: Literal["error", "skip"]  # bad images/annotations: stop, or skip and count them
    contact_sheet_samples: int = Field(ge=1, le=256)


# --------------------------------------------------------------------------- stages (owned by their stage modules)
class EncoderArch(Section):
    """A ViT encoder: a preset of ``components.models.vit.PRESETS``, optionally with dims overridden."""

    preset: str
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
            raise KeyValueError(
                key, d[key], f"img_size {d['img_size']} must be divisible by patch_size {d['patch_size']}"
            )
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

    model: EncoderArch
    decoder_embed_dim: int = Field(ge=4, le=8192)
    decoder_depth: int = Field(ge=1, le=64)
    decoder_num_heads: int = Field(ge=1, le=128)
    mask_ratio: float = Field(gt=0, lt=1)
    norm_pix_loss: bool
    epochs: int = Field(ge=1)
    warmup_epochs: float = Field(ge=0)
    batch_size: int = Field(ge=1)  # per process, per micro-batch
    effective_batch: int | None = Field(ge=1)  # batch_size x accumulation x processes; null: no accumulation
    blr: float = Field(gt=0)  # lr = blr * effective_batch / 256
    min_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    clip_grad: float | None = Field(gt=0)
    crop_scale: tuple[float, float]  # RandomResizedCrop area range
    hflip: float = Field(ge=0, le=1)  # horizontal-flip probability (paper 0.5; 0 for digits, text)
    min_steps: int = Field(ge=0)  # epochs (and warmup) stretch to at least this many optimizer steps
    mean: tuple[float, float, float]  # input normalisation (ImageNet's)
    std: tuple[float, float, float]
    val_images: int | None = Field(ge=1)  # held-out images for the masked-patch loss (null: all)
    figure_images: int = Field(ge=1, le=64)
    ckpt_every: int = Field(ge=1)  # optimizer steps between checkpoints
    log_every: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise KeyValueError(
                "decoder_embed_dim",
                self.decoder_embed_dim,
                f"must be divisible by decoder_num_heads ({self.decoder_num_heads})",
            )
        if self.decoder_embed_dim % 4:
            raise KeyValueError(
                "decoder_embed_dim", self.decoder_embed_dim, "must be divisible by 4 (2D sin-cos position embedding)"
            )
        check_warmup("warmup_epochs", self.warmup_epochs, self.epochs, "epochs")
        batch = self.effective_batch or self.batch_size
        check_peak_lr(self.min_lr, self.blr * batch / 256, f"blr x {batch} / 256")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise KeyValueError("crop_scale", list(self.crop_scale), "must be [min, max] with 0 < min <= max <= 1")
        if not all(0 <= b < 1 for b in self.betas):
            raise KeyValueError("betas", list(self.betas), "each beta must be in [0, 1)")
        if not all(s > 0 for s in self.std):
            raise KeyValueError("std", list(self.std), "must be positive")
        if self.effective_batch is not None and self.effective_batch % self.batch_size:
            raise KeyValueError(
                "effective_batch", self.effective_batch, f"must be a multiple of batch_size ({self.batch_size})"
            )
        return self


class IBOTHeadParams(Section):
    """iBOT projection head (paper: 3 layers, hidden 2048, bottleneck 256, 8192 outputs, shared)."""

    out_dim: int = Field(ge=2)  # [CLS] prototypes K
    patch_out_dim: int = Field(ge=2)  # patch prototypes K' (must equal out_dim with a shared head)
    hidden_dim: int = Field(ge=1)
    bottleneck_dim: int = Field(ge=1)
    nlayers: int = Field(ge=1, le=8)
    norm_last_layer: bool  # keep the weight-norm magnitude fixed at 1
    shared_head: bool  # one head for [CLS] and patch tokens

    @model_validator(mode="after")
    def _check(self):
        if self.shared_head and self.out_dim != self.patch_out_dim:
            raise KeyValueError(
                "patch_out_dim", self.patch_out_dim, f"must equal out_dim ({self.out_dim}) with shared_head: true"
            )
        return self


class IBOTLossParams(Section):
    """L = lambda1 L_cls + lambda2 L_mim; temperatures and centre momenta."""

    lambda1: float = Field(ge=0)  # [CLS] self-distillation
    lambda2: float = Field(ge=0)  # masked image modelling
    student_temp: float = Field(gt=0)
    warmup_teacher_temp: float = Field(gt=0)  # [CLS]: linear warm-up ...
    teacher_temp: float = Field(gt=0)  # ... to this, over warmup_teacher_temp_epochs (paper: 0.07)
    warmup_teacher_patch_temp: float = Field(gt=0)
    teacher_patch_temp: float = Field(gt=0)  # paper: 0.07
    warmup_teacher_temp_epochs: int = Field(ge=0)  # paper: 30
    center_momentum: float = Field(ge=0, lt=1)  # [CLS] centre
    center_momentum2: float = Field(ge=0, lt=1)  # patch centre


class IBOTMaskingParams(Section):
    """BEiT block-wise masking of the global crops (paper: p 0.5, ratio U(0.1, 0.5), aspect 0.3-1/0.3)."""

    prob: float = Field(ge=0, le=1)  # probability that a global crop is masked at all
    ratio: tuple[float, float]  # mask ratio range of a masked crop
    aspect: tuple[float, float]  # block aspect-ratio range
    min_block_area: int | None = Field(ge=1)  # null: (grid // 3) ** 2, 16 on a 14x14 grid

    @model_validator(mode="after")
    def _check(self):
        if not 0 <= self.ratio[0] <= self.ratio[1] < 1:
            raise KeyValueError("ratio", list(self.ratio), "must be [low, high] with 0 <= low <= high < 1")
        if not 0 < self.aspect[0] <= self.aspect[1]:
            raise KeyValueError("aspect", list(self.aspect), "must be [low, high] with 0 < low <= high")
        return self


class IBOTMultiCropParams(Section):
    """DINO multi-crop; the global crops have the encoder's img_size (paper: 224 + 10 x 96)."""

    num_local: int = Field(ge=0, le=32)
    local_size: int = Field(ge=1)  # must be a multiple of the patch size
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    blur_sigma: tuple[float, float]  # PIL Gaussian-blur radius range (DINO: 0.1-2 px at 224 px)
    color_jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue (DINO)
    color_jitter_p: float = Field(ge=0, le=1)
    grayscale_p: float = Field(ge=0, le=1)
    hflip: float = Field(ge=0, le=1)  # horizontal-flip probability of every crop
    blur_p: tuple[float, float, float]  # Gaussian-blur probability: global 1, global 2, local crops
    solarize_p: float = Field(ge=0, le=1)  # solarization probability of the second global crop

    @model_validator(mode="after")
    def _check(self):
        if not all(0 <= p <= 1 for p in self.blur_p):
            raise KeyValueError("blur_p", list(self.blur_p), "must be three probabilities in [0, 1]")
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise KeyValueError(
                "color_jitter",
                list(self.color_jitter),
                "must be [brightness, contrast, saturation, hue], all >= 0, hue <= 0.5",
            )
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise KeyValueError(key, [lo, hi], "must be [min, max] with 0 < min <= max <= 1")
        if self.local_scale[1] > self.global_scale[1]:
            raise KeyValueError(
                "local_scale", list(self.local_scale), f"max must be <= global_scale's max ({self.global_scale[1]})"
            )
        if not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise KeyValueError("blur_sigma", list(self.blur_sigma), "must be [min, max] with 0 <= min <= max")
        return self


class IBOTKNNParams(Section):
    """The teacher's weighted k-NN accuracy (DINO/iBOT: k 20, T 0.07): labeled split -> val."""

    k: int = Field(ge=1)
    temperature: float = Field(gt=0)
    labeled_percent: float = Field(gt=0, le=100)  # one of prepare.classification.labeled_percents
    fold: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    every_epochs: int | None = Field(ge=1)  # also evaluate during training (null: at the end only)
    # Resize(size / crop_pct) + CenterCrop(size); DINO's eval_knn.py at 224 px: 0.875
    crop_pct: float = Field(gt=0, le=1)


class PretrainIBOT(Section):
    """iBOT pretraining (Zhou et al. 2021); the paper's recipe, scaled to the data at hand (defaults:
    the CPU budget on the shapes data; the paper's values are in params/gpu-vit-b16.yaml)."""

    model: EncoderArch
    head: IBOTHeadParams
    loss: IBOTLossParams
    masking: IBOTMaskingParams
    multicrop: IBOTMultiCropParams
    knn: IBOTKNNParams
    epochs: int = Field(ge=1)
    train_images: int | None = Field(ge=1)  # unlabeled images used (a fixed subset; null: all)
    warmup_epochs: float = Field(ge=0)
    min_steps: int = Field(ge=0)  # epochs (and warmup) stretch to at least this many optimizer steps
    batch_size: int = Field(ge=1)  # per process
    blr: float = Field(gt=0)  # lr = blr * batch_size * processes / 256
    min_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)  # cosine schedule weight_decay -> weight_decay_end
    weight_decay_end: float = Field(ge=0)
    betas: tuple[float, float]
    clip_grad: float | None = Field(gt=0)  # per-parameter gradient-norm clipping
    freeze_last_layer_epochs: int = Field(ge=0)
    momentum_teacher: float = Field(ge=0, le=1)  # cosine to 1 over training
    drop_path: float = Field(ge=0, lt=1)  # student only
    mean: tuple[float, float, float]  # input normalisation, recorded in encoder.json
    std: tuple[float, float, float]
    attention_images: int = Field(ge=1, le=64)  # held-out images in the [CLS] attention figure
    ckpt_every: int = Field(ge=1)  # optimizer steps between checkpoints
    log_every: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self):
        check_warmup("warmup_epochs", self.warmup_epochs, self.epochs, "epochs")
        check_warmup("loss.warmup_teacher_temp_epochs", self.loss.warmup_teacher_temp_epochs, self.epochs, "epochs")
        if self.freeze_last_layer_epochs > self.epochs:
            raise KeyValueError(
                "freeze_last_layer_epochs", self.freeze_last_layer_epochs, f"must be <= epochs ({self.epochs})"
            )
        check_peak_lr(self.min_lr, self.blr * self.batch_size / 256, f"blr x {self.batch_size} / 256")
        if not all(0 <= b < 1 for b in self.betas):
            raise KeyValueError("betas", list(self.betas), "each beta must be in [0, 1)")
        if not all(s > 0 for s in self.std):
            raise KeyValueError("std", list(self.std), "must be positive")
        if self.weight_decay == 0 and self.weight_decay_end > 0:
            raise KeyValueError(
                "weight_decay", 0, "must be > 0 when weight_decay_end > 0 (0 marks a group that never decays)"
            )
        spec = self.model.dims()
        if self.multicrop.local_size % spec["patch_size"]:
            raise KeyValueError(
                "multicrop.local_size",
                self.multicrop.local_size,
                f"must be a multiple of the patch size ({spec['patch_size']})",
            )
        if self.multicrop.local_size > spec["img_size"]:
            raise KeyValueError(
                "multicrop.local_size",
                self.multicrop.local_size,
                f"must be <= the global crop, the encoder's img_size ({spec['img_size']})",
            )
        return self


class FinetuneViT(Section):
    """ViT fine-tuning (MAE ``main_finetune.py``); layer decay applies to pretrained encoders only."""

    scratch_model: EncoderArch  # the scratch ViT; keep it equal to the pretrained encoders
    global_pool: Literal["avg", "token"]  # avg: mean of patch tokens + fc_norm (MAE); token: [CLS]
    drop_path: float = Field(ge=0, lt=1)
    layer_decay: float = Field(gt=0, le=1)
    blr: float = Field(gt=0)  # lr = blr * effective batch / 256
    weight_decay: float = Field(ge=0)


class FinetuneCNN(Section):
    """The CNN baseline (a torchvision ResNet, CIFAR stem on small images), trained from scratch."""

    arch: Literal["resnet10", "resnet18", "resnet34", "resnet50"]
    width: int = Field(ge=1, le=256)  # channels of the first stage (torchvision: 64)
    blr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)


class FinetuneProbe(Section):
    """Frozen encoder -> BatchNorm (no affine) -> Linear, trained on cached features (MAE Sec. A.2)."""

    enabled: bool
    pool: Literal["token", "avg"]
    epochs: int = Field(ge=1)
    warmup_epochs: int = Field(ge=0)
    batch_size: int = Field(ge=2)
    blr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)


class FinetuneKNN(Section):
    """Weighted k-NN on frozen features (DINO/iBOT: k 20, T 0.07)."""

    enabled: bool
    k: int = Field(ge=1)
    temperature: float = Field(gt=0)


class FinetuneEarlyStop(Section):
    """Early stopping on a held-out part of the labeled split, fixed by the run's seed (holdout_fraction 0: off)."""

    holdout_fraction: float = Field(ge=0, lt=1)  # of each class's labeled images, scored every eval_every epochs
    patience: int = Field(ge=1)  # evaluations without a better held-out top-1 before training stops


class Finetune(Section):
    """Fine-tuning of every init (scratch, mae, ibot, cnn) on one labeled split; shared data and schedule."""

    seeds: list[StrictInt]  # finetune@<init>-<seed>: one run per seed
    labeled_percent: float = Field(gt=0, le=100)  # one of prepare.classification.labeled_percents
    fold: int = Field(ge=0)
    epochs: int = Field(ge=1)
    warmup_epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)  # per process, per micro-batch
    accum_steps: int = Field(ge=1)
    min_lr: float = Field(ge=0)
    clip_grad: float | None = Field(gt=0)
    mixup: float = Field(ge=0)  # Mixup alpha (0: off)
    cutmix: float = Field(ge=0)  # CutMix alpha (0: off)
    label_smoothing: float = Field(ge=0, lt=1)
    rand_augment: str | None  # timm RandAugment string; null: off
    re_prob: float = Field(ge=0, le=1)  # random erasing
    crop_scale: tuple[float, float]  # RandomResizedCrop area range
    hflip: float = Field(ge=0, le=1)  # horizontal-flip probability (timm/MAE 0.5; 0 for digits, text)
    min_steps: int = Field(ge=0)  # epochs (and warmup) stretch to at least this many optimizer steps
    mean: tuple[float, float, float]  # overridden by a pretrained encoder.json's own
    std: tuple[float, float, float]
    eval_every: int = Field(ge=1)  # epochs between held-out evaluations (the last epoch always)
    # held-out, probe and k-NN views: Resize(size / crop_pct) + CenterCrop(size); MAE at 224 px: 0.875
    eval_crop_pct: float = Field(gt=0, le=1)
    eval_batch_size: int = Field(ge=1)
    ckpt_every: int = Field(ge=1)  # optimizer steps between checkpoints
    early_stop: FinetuneEarlyStop
    vit: FinetuneViT
    cnn: FinetuneCNN
    linear_probe: FinetuneProbe
    knn: FinetuneKNN

    _seeds = field_validator("seeds")(check_seeds)

    @model_validator(mode="after")
    def _check(self):
        check_warmup("warmup_epochs", self.warmup_epochs, self.epochs, "epochs")
        batch = self.batch_size * self.accum_steps
        for key, blr in (("vit.blr", self.vit.blr), ("cnn.blr", self.cnn.blr)):
            check_peak_lr(self.min_lr, blr * batch / 256, f"{key} x {batch} / 256")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise KeyValueError(
                "batch_size",
                self.batch_size,
                "must be even when mixup or cutmix > 0 (timm mixes each batch with its reverse)",
            )
        probe = self.linear_probe
        check_warmup("linear_probe.warmup_epochs", probe.warmup_epochs, probe.epochs, "linear_probe.epochs")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise KeyValueError("crop_scale", list(self.crop_scale), "must be [min, max] with 0 < min <= max <= 1")
        if not all(s > 0 for s in self.std):
            raise KeyValueError("std", list(self.std), "must be positive")
        if self.rand_augment:
            from timm.data import rand_augment_transform

            try:
                rand_augment_transform(self.rand_augment, {})
            except Exception:  # noqa: BLE001 (timm raises assorted errors for bad strings)
                raise KeyValueError(
                    "rand_augment", self.rand_augment, "not a timm RandAugment string like 'rand-m9-mstd0.5-inc1'"
                ) from None
        return self


class DetectModel(Section):
    """The detector: torchvision Faster R-CNN with a ResNet-FPN, or a pretrained ViT + simple pyramid."""

    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50", "vit"]
    init: str  # scratch | torchvision (ImageNet weights, downloaded) | mae | ibot (vit) | path to a ResNet state dict
    width: int = Field(ge=4, le=256)  # ResNet stage widths width * (1, 2, 4, 8); torchvision: 64
    norm: Literal["gn", "bn", "frozen_bn"]  # ResNet norm: gn from scratch, frozen_bn with pretrained weights
    trainable_layers: int = Field(ge=0, le=5)
    fpn_channels: int = Field(ge=8)
    representation_size: int = Field(ge=8)  # box head width
    anchor_sizes: list[int] = Field(min_length=5, max_length=5)
    aspect_ratios: list[float] = Field(min_length=1)
    min_size: int = Field(ge=16)  # test-time resize (training views keep the size the views give them)
    max_size: int = Field(ge=16)
    rpn_batch_size_per_image: int = Field(ge=1)
    box_batch_size_per_image: int = Field(ge=1)
    rpn_post_nms_top_n_train: int = Field(ge=1)
    rpn_post_nms_top_n_test: int = Field(ge=1)
    box_detections_per_img: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.init in ("mae", "ibot") and self.backbone != "vit":
            raise KeyValueError("init", self.init, f"a {self.init} encoder needs backbone: vit (got {self.backbone})")
        if self.backbone == "vit" and self.init not in ("scratch", "mae", "ibot"):
            raise KeyValueError("init", self.init, "backbone vit starts from scratch, mae or ibot")
        if self.backbone != "vit" and self.init != "scratch" and self.norm == "gn":
            raise KeyValueError(
                "norm", self.norm, f"pretrained ResNet weights need norm frozen_bn or bn (init: {self.init})"
            )
        if self.backbone != "vit" and self.init == "scratch" and self.norm == "frozen_bn":
            raise KeyValueError(
                "norm",
                self.norm,
                "a ResNet trained from scratch needs norm gn or bn: frozen_bn keeps fresh weights' identity statistics",
            )
        if self.init != "scratch" and self.backbone != "vit" and (self.width != 64 or self.backbone == "resnet10"):
            raise KeyValueError(
                "width",
                self.width,
                f"pretrained weights exist for torchvision's ResNets at width 64 (init: {self.init})",
            )
        if any(s <= 0 for s in self.anchor_sizes) or any(a <= 0 for a in self.aspect_ratios):
            raise KeyValueError("anchor_sizes", self.anchor_sizes, "anchor sizes and aspect ratios must be positive")
        if self.min_size > self.max_size:
            raise KeyValueError("min_size", self.min_size, f"must be <= max_size ({self.max_size})")
        return self


class DetectViews(Section):
    """Soft Teacher's views: weak (resize + flip) for the teacher and the labeled images, strong for the student."""

    resize_range: tuple[float, float]  # random resize factor of the scene (when short_side_range is null)
    short_side_range: tuple[int, int] | None  # absolute: short side drawn in [lo, hi] px, long side <= model.max_size
    flip_p: float = Field(ge=0, le=1)
    translate: float = Field(ge=0, lt=1)  # strong: fraction of the size
    rotate: float = Field(ge=0, le=180)  # strong: degrees
    shear: float = Field(ge=0, lt=90)  # strong: degrees
    erase_n: tuple[int, int]  # strong: random erases
    erase_size: float = Field(ge=0, lt=1)  # strong: max side of an erase (fraction of the shorter side)
    colour: bool  # labeled and strong: one random colour op (the official pipeline); false: none

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.resize_range[0] <= self.resize_range[1]:
            raise KeyValueError("resize_range", list(self.resize_range), "must be [min, max] with 0 < min <= max")
        if self.short_side_range is not None and not 0 < self.short_side_range[0] <= self.short_side_range[1]:
            raise KeyValueError(
                "short_side_range", list(self.short_side_range), "must be [min, max] pixels with 0 < min <= max"
            )
        if not 0 <= self.erase_n[0] <= self.erase_n[1]:
            raise KeyValueError("erase_n", list(self.erase_n), "must be [min, max] with 0 <= min <= max")
        return self


class DetectSoftTeacher(Section):
    """Soft Teacher (Xu et al. 2021); official defaults except where the short CPU schedule needs otherwise."""

    unsup_weight: float = Field(ge=0)  # alpha in L = L_sup + alpha * L_unsup
    unlabeled_ratio: int = Field(ge=1, le=64)  # unlabeled images per labeled image in a batch (paper 1:4)
    rpn_threshold: float = Field(ge=0, le=1)  # pseudo boxes for the RPN: score > threshold
    cls_threshold: float = Field(ge=0, le=1)  # pseudo boxes for classification: score > threshold
    initial_threshold: float = Field(ge=0, le=1)  # candidates for box jitter: score > threshold
    reg_uncertainty: float = Field(gt=0)  # regression targets: jitter uncertainty < this
    jitter_times: int = Field(ge=2)
    jitter_scale: float = Field(gt=0)
    ema_momentum: float = Field(ge=0, lt=1)  # teacher momentum min(m, 1 - 1/(t+1)) after t student steps
    # also copy the student's buffers each update (reference: parameters only; needed with norm bn)
    ema_buffers: bool
    # supervised-only steps first (0: end-to-end, the paper); the teacher restarts as a copy
    burn_in_steps: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.initial_threshold > min(self.rpn_threshold, self.cls_threshold):
            raise KeyValueError(
                "initial_threshold", self.initial_threshold, "must be <= rpn_threshold and cls_threshold"
            )
        return self


class Detect(Section):
    """detect@<method>-<percent>: the supervised baseline and Soft Teacher on the same detector and
    schedule, for every labeled percent of prepare.detection.labeled_percents (the dvc.yaml matrix)."""

    seeds: list[StrictInt]  # detect@<method>-<percent>-<seed>: one run per seed
    fold: int = Field(ge=0)  # which fold of prepare's splits
    class_agnostic: bool  # merge every category into one "object" class (training and AP)
    model: DetectModel
    views: DetectViews
    soft_teacher: DetectSoftTeacher
    steps: int = Field(ge=1)  # optimizer steps (both methods)
    batch_size: int = Field(ge=1)  # labeled images per step and process (+ batch_size * unlabeled_ratio unlabeled)
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)  # sgd
    betas: tuple[float, float]  # adamw
    weight_decay: float = Field(ge=0)  # norms and biases exempt
    warmup_steps: int = Field(ge=0)
    lr_milestones: list[float]  # fractions of steps where lr x0.1 (paper: 120k, 160k of 180k)
    clip_grad: float | None = Field(gt=0)
    eval_every: int = Field(ge=1)  # steps between held-out evaluations (AP curve); the last step always
    eval_batch_size: int = Field(ge=1)
    val_images: int | None = Field(ge=1)  # held-out scenes evaluated (null: all)
    figure_images: int = Field(ge=1, le=64)
    figure_score: float = Field(ge=0, le=1)  # detections drawn in the figure: score >= this
    ckpt_every: int = Field(ge=1)
    log_every: int = Field(ge=1)

    _seeds = field_validator("seeds")(check_seeds)

    @model_validator(mode="after")
    def _check(self):
        check_warmup("warmup_steps", self.warmup_steps, self.steps, "steps")
        if self.model.backbone != "vit" and self.model.norm == "bn" and not self.soft_teacher.ema_buffers:
            raise KeyValueError(
                "soft_teacher.ema_buffers",
                False,
                "must be true with model.norm 'bn': the teacher's "
                "BatchNorm statistics would stay at their initial values",
            )
        if self.soft_teacher.burn_in_steps >= self.steps:
            raise KeyValueError(
                "soft_teacher.burn_in_steps", self.soft_teacher.burn_in_steps, f"must be < steps ({self.steps})"
            )
        if any(not 0 < m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise KeyValueError("lr_milestones", self.lr_milestones, "must be increasing fractions of steps in (0, 1)")
        if not all(0 <= b < 1 for b in self.betas):
            raise KeyValueError("betas", list(self.betas), "each beta must be in [0, 1)")
        return self


class CKA(Section):
    """Minibatch CKA (Kornblith et al. 2019; Nguyen et al. 2021) between every layer of the MAE ViT,
    the iBOT ViT, one fine-tuned ViT and the CNN, on the held-out (val) images."""

    finetuned: Literal["scratch", "mae", "ibot"]  # which finetune@<init> ViT is compared
    kernel: Literal["linear", "rbf"]
    rbf_threshold: float = Field(gt=0)  # rbf: sigma = threshold * sqrt(median squared distance)
    debiased: bool  # unbiased HSIC (U-centering); false: the biased estimator
    pooling: Literal["mean", "cls", "flatten"]  # ViT tokens / CNN maps -> one row per image
    vit_layers: list[str] = Field(min_length=1)  # names or globs (* = one name part)
    cnn_layers: list[str] = Field(min_length=1)
    batch_size: int = Field(ge=8)  # upper bound; equal batches of >= 4 images (debiased CKA needs 4)
    crop_pct: float = Field(gt=0, le=1)  # Resize(size / crop_pct) + CenterCrop(size), as finetune.eval_crop_pct
    max_images: int | None = Field(ge=4)  # a random subset of N held-out images, drawn with runtime.seed (null: all)


class Report(Section):
    title: str


# --------------------------------------------------------------------------- the file
class Params(Section):
    runtime: Runtime
    tracking: Tracking
    prepare: Prepare
    pretrain_mae: PretrainMAE
    pretrain_ibot: PretrainIBOT
    finetune: Finetune
    detect: Detect
    cka: CKA
    report: Report

    @model_validator(mode="after")
    def _check(self):
        """Rules across sections: a stage reads a labeled split that prepare writes."""
        cls, det = self.prepare.classification, self.prepare.detection
        for key, section in (("pretrain_ibot.knn", self.pretrain_ibot.knn), ("finetune", self.finetune)):
            if section.labeled_percent not in cls.labeled_percents:
                raise KeyValueError(
                    f"{key}.labeled_percent",
                    section.labeled_percent,
                    f"must be one of prepare.classification.labeled_percents {cls.labeled_percents}",
                )
            if section.fold >= cls.folds:
                raise KeyValueError(
                    f"{key}.fold", section.fold, f"must be < prepare.classification.folds ({cls.folds})"
                )
        if self.detect.fold >= det.folds:
            raise KeyValueError("detect.fold", self.detect.fold, f"must be < prepare.detection.folds ({det.folds})")
        return self


def _describe(error: dict, source: str) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, KeyValueError):
        key = f"{loc}.{cause.key}" if loc else cause.key
        return f"{source}: {key} = {cause.value!r}: {cause.allowed}"
    if error["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key"
    if error["type"] == "missing":
        return f"{source}: {loc}: missing key"
    if error["type"] == "model_type" and error.get("input") is None:
        return f"{source}: {loc}: empty section (every key is required)"
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


# Keys that were renamed: old key path -> new key path. A params file with an old name fails with one line naming
# the new key (rather than "extra inputs are not permitted"). The base learning rate is ``blr`` in every section
# (MAE's name: lr = blr x effective batch / 256); detect.lr stays: it is an absolute lr, as in torchvision's
# detection references and Soft Teacher's configs, not scaled by the batch.
RENAMED = {
    "pretrain_mae.base_lr": "pretrain_mae.blr",
    "pretrain_ibot.base_lr": "pretrain_ibot.blr",
}


def check_renamed(raw: dict, source: str) -> None:
    """A one-line ``ParamsError`` naming the new key when ``raw`` uses a key's old name (``RENAMED``)."""
    for old, new in RENAMED.items():
        *parents, key = old.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            raise ParamsError(f"{source}: {old}: renamed to {new}")


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params file; any error is a ``ParamsError`` whose message is one line."""
    if raw is None:
        raise ParamsError(f"{source}: empty file; it must hold every section ({', '.join(Params.model_fields)})")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    check_renamed(raw, source)
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), except that a key given twice in one mapping is an error
    rather than the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely: UTF-8 only, plain data only, duplicate keys rejected. Errors are one-line
    ``ParamsError``s naming the file and where (line and column, or the byte offset of a non-UTF-8 byte)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ParamsError(
            f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line})"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ParamsError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file (see the module docstring for the rules)."""
    return validate_params(read_yaml(path), str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.config [FILE ...]``: validate params files (default params.yaml); one line on
    stderr and exit 2 for the first bad one."""
    for path in (argv if argv is not None else sys.argv[1:]) or ["params.yaml"]:
        try:
            load_params(path)
        except ParamsError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_PARAMS
    return 0


if __name__ == "__main__":
    sys.exit(main())
