"""Layer features for representation similarity: pick layers by name or pattern, capture their
outputs with forward hooks, and feed several models the very same batches.

Raghu et al. 2021, "Do Vision Transformers See Like Convolutional Neural Networks?" (Sec. 3) compare
every Transformer block of a ViT with every residual block of a ResNet on the same images. Here a
timm ViT's layers are its blocks (``blocks.N``, output [N, T, D]) and a torchvision ResNet's its
residual blocks (``layerK.M``, output [N, C, H, W]). Popular CKA packages iterate one shuffled loader
once per model, so the two models see different images; :func:`paired_features` runs one loader
pass and feeds every model each batch, so every layer of every model describes the same examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

POOLINGS = ("mean", "cls", "flatten")


def pattern_regex(pattern: str) -> re.Pattern:
    """A layer pattern as a regex: ``*`` matches within one dotted name part, ``**`` across parts;
    everything else is literal (``blocks.*`` = every ``blocks.N``, not ``blocks.N.attn``)."""
    parts = re.split(r"(\*\*|\*)", pattern)
    body = "".join(".*" if p == "**" else "[^.]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(body)


def default_layer_patterns(model: nn.Module) -> list[str]:
    """Every Transformer block of a timm ViT, every residual block of a torchvision ResNet."""
    names = {name for name, _ in model.named_modules()}
    if any(re.fullmatch(r"blocks\.\d+", n) for n in names):
        return ["blocks.*"]
    if any(re.fullmatch(r"layer\d+\.\d+", n) for n in names):
        return ["layer*.*"]
    raise ValueError(f"no default layers for {type(model).__name__}: give layer names or patterns")


def _available(model: nn.Module) -> str:
    """Module names up to two dotted levels, for error messages."""
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
    return ", ".join(names)


def select_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the modules matching any of ``patterns`` (exact names or ``*``/``**`` globs), in the
    model's module order. A pattern that matches nothing is an error that lists the available names."""
    patterns = list(patterns) if patterns else default_layer_patterns(model)
    names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for p in patterns:
        rx = pattern_regex(p)
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"layer pattern {p!r} matches no module of {type(model).__name__}; available: {_available(model)} "
                "(and their submodules)"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def pool_features(out: torch.Tensor, pooling: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """One layer's output -> [N, D] rows, one per example.

    Tokens [N, T, D] (ViT): ``mean`` averages the patch tokens (after ``num_prefix_tokens``),
    ``cls`` takes token 0, ``flatten`` keeps every token [N, T*D].
    Maps [N, C, H, W] (CNN): ``mean`` (and ``cls``: a CNN has no class token) is global average
    pooling [N, C]; ``flatten`` keeps every position [N, C*H*W].
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    if pooling == "flatten" or out.dim() == 2:
        return out.reshape(out.shape[0], -1)
    if out.dim() == 3:  # [N, T, D]
        if pooling == "cls":
            if num_prefix_tokens < 1:
                raise ValueError("pooling 'cls' needs a model with a class token")
            return out[:, 0]  # [N, D]
        return out[:, num_prefix_tokens:].mean(dim=1)  # [N, D]
    if out.dim() == 4:  # [N, C, H, W]
        return out.mean(dim=(2, 3))  # [N, C]
    raise ValueError(f"cannot pool a layer output of shape {tuple(out.shape)}")


class LayerCapture:
    """Forward hooks that store each chosen layer's pooled output of the latest forward pass.

    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], pooling: str = "mean") -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        modules = dict(model.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(
                f"unknown layers {unknown} of {type(model).__name__}; available: {_available(model)} (and their "
                "submodules)"
            )
        self.model, self.layers, self.pooling = model, list(layers), pooling
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args, out) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            self.features[name] = pool_features(out.detach(), self.pooling, self.prefix)

        return hook

    def __enter__(self) -> LayerCapture:
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the model on ``images`` and return {layer: [N, D]} in layer order."""
        self.features = {}
        self.model(images)
        missing = [n for n in self.layers if n not in self.features]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass")
        return {n: self.features[n] for n in self.layers}


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def paired_features(
    models: Mapping[str, nn.Module],
    layers: Mapping[str, Sequence[str]],
    batches: Iterable,
    pooling: str = "mean",
    device: str | torch.device = "cpu",
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    sep: str = "/",
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``batches`` (images, or (images, labels)) feeding every model each batch.

    ``transforms[name]`` (optional) maps the batch to that model's input, e.g. its own normalisation.
    Yields {"<model><sep><layer>": [N, D]} per batch, every entry computed from the same images
    in the same order. Models are put in eval mode.
    """
    transforms = transforms or {}
    captures = {}
    for name, model in models.items():
        model.eval()
        captures[name] = LayerCapture(model, layers[name], pooling)
    for cap in captures.values():
        cap.__enter__()
    try:
        for batch in batches:
            x = _images(batch).to(device, non_blocking=True)  # [N, C, H, W]
            out: dict[str, torch.Tensor] = {}
            for name, cap in captures.items():
                inputs = transforms[name](x) if name in transforms else x
                for layer, f in cap(inputs).items():
                    out[f"{name}{sep}{layer}"] = f
            yield out
    finally:
        for cap in captures.values():
            cap.__exit__(None, None, None)
