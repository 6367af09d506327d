"""Stage ``cka``: minibatch CKA between every layer of the MAE-pretrained ViT, the iBOT-pretrained ViT,
one fine-tuned ViT and the CNN baseline, on the held-out images (Raghu et al. 2021, Sec. 3-4).

One pass over the val split, in index order, feeds every model each batch (each with its own input
normalisation), and one ``MinibatchCKA`` accumulates the HSIC of every layer pair of every model at
once, so every model sees exactly the same images. Writes ``metrics/cka.json`` (each model's layer
names, the CKA matrix of each model with itself and with every other model, and a few summaries),
``plots/cka/<a>__<b>.png`` heatmaps and ``plots/cka/summary.png``, all logged to MLflow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader

from components.analysis.cka import MinibatchCKA
from components.analysis.features import paired_features, select_layers
from components.analysis.heatmap import plot_cka_grid, plot_cka_heatmap
from components.data.sources import DataError, ImageListDataset
from components.io import read_json
from components.models.classifier import CLASSIFIER_SPEC, load_classifier
from components.models.vit import ENCODER_SPEC, load_encoder, read_normalisation
from pipelines import layout
from pipelines.common import StageContext, classification_index, run_stage

log = logging.getLogger("mimflow.cka")


def model_dirs(finetuned: str, seed: int) -> dict[str, Path]:
    """The compared models, in the order of the heatmaps: name -> weights directory. The fine-tuned
    ViT and the CNN are the runs of ``seed`` (the first of finetune.seeds)."""
    return {
        **layout.ENCODER_DIRS,
        "finetuned": layout.finetuned_dir(finetuned, seed),
        "cnn": layout.finetuned_dir("cnn", seed),
    }


def titles(finetuned: str, cnn_arch: str) -> dict[str, str]:
    return {
        "mae": "ViT (MAE)",
        "ibot": "ViT (iBOT)",
        "finetuned": f"ViT (fine-tuned, {finetuned} init)",
        "cnn": f"CNN ({cnn_arch})",
    }


def normalisation(ctx: StageContext, name: str, meta: dict) -> tuple[list[float], list[float]]:
    """The input mean/std a model was trained with: its own JSON's, else (a fine-tuned ViT) its
    encoder's, else the finetune section's (what finetune falls back to)."""
    own = (meta["mean"], meta["std"]) if "mean" in meta and "std" in meta else None
    if own is None and name == "finetuned" and ctx.section.finetuned in layout.ENCODER_DIRS:
        encoder_dir = ctx.root / layout.ENCODER_DIRS[ctx.section.finetuned]
        if (encoder_dir / ENCODER_SPEC).is_file():
            own = read_normalisation(encoder_dir)
    mean, std = own or (ctx.params.finetune.mean, ctx.params.finetune.std)
    return list(mean), list(std)


def load_models(ctx: StageContext, image_size: int) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """name -> model (eval, on the device), and name -> {"path", "arch", "mean", "std"}."""
    models, info = {}, {}
    for name, rel in model_dirs(ctx.section.finetuned, ctx.params.finetune.seeds[0]).items():
        path = ctx.root / rel
        if name in layout.ENCODER_DIRS:
            model, spec = load_encoder(path)
            meta = read_json(path / ENCODER_SPEC)
            size = spec.img_size
        else:
            model = load_classifier(path)
            meta = read_json(path / CLASSIFIER_SPEC)
            size = int(meta["img_size"])
        if size != image_size:
            raise ValueError(
                f"{path}: model img_size {size} differs from the held-out images' image_size {image_size} "
                f"({ctx.root / layout.CLASSIFICATION_INDEX})"
            )
        mean, std = normalisation(ctx, name, meta)
        models[name] = model.eval().to(ctx.device)
        info[name] = {"path": str(rel), "arch": meta["arch"], "mean": mean, "std": std}
    return models, info


def held_out_sample(items: list, max_images: int | None, seed: int) -> list:
    """The held-out images in a fixed random order (the first ``max_images`` of it, or all). Minibatch
    CKA averages HSIC over batches that must each be a random sample of the data (Nguyen et al. 2021
    Sec. 3.1); an index lists its images class by class, so batches cut in index order would each hold
    one or two classes and overstate the similarity of class-specific layers."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order][: max_images or None]


def equal_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 in order, split into ceil(n / batch_size) batches whose sizes differ by at most 1
    (no tiny last batch: the debiased estimator needs at least 4 examples per batch; every batch holds
    more than batch_size / 2 images when there are several, so batch_size >= 8 guarantees 4)."""
    k = -(-n // batch_size)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def pair_summary(m: torch.Tensor, a: str, b: str) -> dict:
    """Scalars for MLflow and `dvc metrics`: the mean CKA; the mean over corresponding layers (square
    matrices); a model with itself: the mean off-diagonal similarity (how uniform its layers are,
    Raghu et al. 2021 Fig. 1); a ViT with the CNN: the lowest layers' CKA and the best match any CNN
    layer finds for the top ViT block (Raghu et al. Fig. 2: high, and low)."""
    out = {"mean": float(m.mean())}
    if m.shape[0] == m.shape[1]:
        out["diagonal"] = float(m.diagonal().mean())
    if a == b and m.shape[0] > 1:
        off = ~torch.eye(m.shape[0], dtype=torch.bool)
        out["offdiagonal"] = float(m[off].mean())
    if b == "cnn" and a != "cnn":
        out["lowest_layers"] = float(m[0, 0])
        out["top_vit_best_cnn"] = float(m[-1].max())
    return out


def select_model_layers(ctx: StageContext, models: dict[str, nn.Module], info: dict) -> dict[str, list[str]]:
    """Each model's compared layers (``cka.vit_layers`` / ``cka.cnn_layers`` patterns), recorded in ``info``."""
    cfg = ctx.section
    layers = {}
    for name, model in models.items():
        patterns = cfg.cnn_layers if name == "cnn" else cfg.vit_layers
        try:
            layers[name] = select_layers(model, patterns)
        except ValueError as e:
            raise ValueError(f"cka.{'cnn' if name == 'cnn' else 'vit'}_layers: {e}") from None
        info[name]["layers"] = layers[name]
    return layers


def accumulate(
    ctx: StageContext, models: dict[str, nn.Module], layers: dict, info: dict, items: list, size: int
) -> tuple[MinibatchCKA, torch.Tensor, float]:
    """One pass over ``items`` in equal batches, every model fed each batch (normalised its own way), one
    minibatch CKA accumulator over every layer of every model (Nguyen et al. 2021)."""
    cfg = ctx.section
    names = [f"{m}/{layer}" for m in models for layer in layers[m]]
    # [3, H, W] in [0, 1]: bicubic Resize(size / crop_pct), CenterCrop(size); each model normalises its own way
    to_tensor = create_transform(
        size, is_training=False, crop_pct=cfg.crop_pct, interpolation="bicubic", mean=(0.0,) * 3, std=(1.0,) * 3
    )
    batches = equal_batches(len(items), cfg.batch_size)
    loader = DataLoader(ImageListDataset(items, to_tensor), batch_sampler=batches, num_workers=ctx.num_workers)
    norms = {name: T.Normalize(i["mean"], i["std"]) for name, i in info.items()}
    autocast = ctx.device.type == "cuda" and ctx.precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if ctx.precision == "bf16" else torch.float16

    acc = MinibatchCKA(names, kernel=cfg.kernel, debiased=cfg.debiased, threshold=cfg.rbf_threshold, device=ctx.device)
    t = time.perf_counter()
    with torch.autocast(ctx.device.type, dtype=dtype, enabled=autocast):
        for feats in paired_features(models, layers, loader, cfg.pooling, ctx.device, transforms=norms):
            acc.update(feats)
    matrix = acc.compute()  # [L, L]
    seconds = time.perf_counter() - t
    log.info(
        "CKA of %d layers over %d images in %d batches: %.1f s", len(names), acc.num_examples, acc.num_batches, seconds
    )
    return acc, matrix, seconds


def write_pairs(
    ctx: StageContext, order: list[str], layers: dict, info: dict, acc: MinibatchCKA, matrix: torch.Tensor
) -> tuple[dict, dict]:
    """Per pair of models (a model with itself included): the CKA block, its summary and heatmap; then the
    grid of every heatmap. Returns (pairs, summary) for the metrics."""
    cfg = ctx.section
    heads = titles(cfg.finetuned, info["cnn"]["arch"])
    pairs, summary, panels = {}, {}, []
    for i, a in enumerate(order):
        for b in order[i:]:
            rows, cols = [f"{a}/{n}" for n in layers[a]], [f"{b}/{n}" for n in layers[b]]
            m = acc.block(matrix, rows, cols)  # [La, Lb]
            key = f"{a}__{b}"
            pairs[key] = {
                "row_layers": rows,
                "col_layers": cols,
                "cka": [[round(float(v), 6) for v in row] for row in m],
            }
            summary[key] = pair_summary(m, a, b)
            panel = {
                "matrix": m,
                "rows": layers[a],
                "cols": layers[b],
                "row_label": heads[a],
                "col_label": heads[b],
                "title": f"{heads[a]} vs {heads[b]}",
                "at": (i, order.index(b)),
            }
            panels.append(panel)
            fig = plot_cka_heatmap(
                m,
                layers[a],
                layers[b],
                heads[a],
                heads[b],
                f"{'debiased' if cfg.debiased else 'biased'} {cfg.kernel} CKA, {acc.num_examples} images",
            )
            layout.write_figure(fig, ctx.plots_dir / f"{key}.png", ctx, dpi=120)
    grid = plot_cka_grid(
        panels,
        f"CKA between every layer ({cfg.kernel}, {'debiased' if cfg.debiased else 'biased'}, "
        f"{acc.num_examples} held-out images)",
    )
    layout.write_figure(grid, ctx.plots_dir / "summary.png", ctx, dpi=120)
    return pairs, summary


def cka(ctx: StageContext) -> dict:
    """CKA between every layer of the MAE, iBOT, fine-tuned ViTs and the CNN on the held-out images."""
    cfg = ctx.section
    # ---- data: a seeded sample of the held-out images
    index = classification_index(ctx)
    items = held_out_sample(index.val, cfg.max_images, ctx.seed)
    if cfg.debiased and len(items) < 4:
        raise DataError(
            f"{ctx.root / layout.CLASSIFICATION_INDEX}: {len(items)} held-out images; debiased CKA needs at least 4"
        )
    # ---- models and their layers
    models, info = load_models(ctx, index.image_size)
    layers = select_model_layers(ctx, models, info)
    # ---- the accumulation over minibatches
    acc, matrix, seconds = accumulate(ctx, models, layers, info, items, index.image_size)
    degenerate = acc.degenerate()
    if degenerate:
        log.warning("layers without any variation on these images (CKA 0 with everything): %s", ", ".join(degenerate))
    if not ctx.is_main:
        return {}
    # ---- outputs
    pairs, summary = write_pairs(ctx, list(models), layers, info, acc, matrix)
    return {
        "kernel": cfg.kernel,
        "debiased": cfg.debiased,
        "pooling": cfg.pooling,
        "images": acc.num_examples,
        "seed": ctx.seed,
        "batches": acc.num_batches,
        "cka_s": round(seconds, 2),
        "models": info,
        "degenerate_layers": degenerate,
        "summary": summary,
        "pairs": pairs,
    }


if __name__ == "__main__":
    run_stage("cka", cka)
