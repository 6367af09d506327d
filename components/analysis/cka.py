"""Centered Kernel Alignment between representations: kernels, centering, HSIC estimators and a
minibatch accumulator that yields every layer pair of several models at once.

Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited" (Sec. 3-4 and the
reference notebook ``representation_similarity/Demo.ipynb``): linear and RBF kernels,
CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), biased HSIC from H K H with
H = I - 11^T/n, debiased HSIC (Song et al. 2012) computed stably by U-centering.
Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?" (Sec. 3.1):
minibatch CKA = mean_i HSIC1(K_i, L_i) / sqrt(mean_i HSIC1(K_i, K_i) mean_i HSIC1(L_i, L_i)).

Numerics: features are cast to float64 and centred per batch before any Gram matrix is formed.
Centring is exact for CKA (both H-centering and U-centering annihilate the rank-one terms a shared
mean adds to a Gram matrix), and it removes the catastrophic cancellation that makes Song's formula
on raw Grams return 0 or NaN for float32 features with a large shared mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

KERNELS = ("linear", "rbf")


def _as_float64(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """[n, ...] features -> [n, d] float64, centred over the examples (rows)."""
    x = x.detach().reshape(x.shape[0], -1).to(device=device, dtype=torch.float64)  # [n, d]
    return x - x.mean(dim=0, keepdim=True)


def _center_features(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Centre features in float64. A constant representation (a layer that never fires) becomes
    exactly zero, so its HSIC with anything is exactly 0: float16/bfloat16/float32 inputs centre to
    exact zeros in float64 by themselves; float64 inputs whose residuals are within the rounding of the
    mean (n * eps relative to the largest value) are zeroed."""
    xc = _as_float64(x, device)  # [n, d]
    if xc.numel():
        tol = 64 * x.shape[0] * torch.finfo(torch.float64).eps
        if xc.abs().amax() <= tol * x.detach().abs().amax().to(device=xc.device, dtype=torch.float64):
            xc.zero_()
    return xc


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel K = X X^T of features [n, ...] -> [n, n] (float64, features centred first)."""
    xc = _center_features(x)  # [n, d]
    return xc @ xc.T  # [n, n]


def _sq_distances(gram: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances from a (centred) linear Gram matrix [..., n, n]."""
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)  # [..., n]
    d2 = (sq[..., :, None] + sq[..., None, :] - 2 * gram).clamp_min_(0)  # [..., n, n]
    d2.diagonal(dim1=-2, dim2=-1).zero_()
    return d2


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median over the last dim, averaging the two middle values for even sizes (numpy's median)."""
    m = v.shape[-1]
    lo = torch.kthvalue(v, (m + 1) // 2, dim=-1).values
    if m % 2:
        return lo
    return (lo + torch.kthvalue(v, m // 2 + 1, dim=-1).values) / 2


def rbf_from_linear(gram: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF kernel exp(-D^2 / (2 sigma^2)) with sigma = threshold * sqrt(median(D^2)), the median taken
    over the full n x n matrix of squared distances (Kornblith 2019 notebook ``gram_rbf``).

    ``gram`` is a linear Gram matrix [..., n, n] of the same examples. If more than half of the
    distances are zero the median is 0; sigma then falls back to the mean squared distance, and a
    representation with no variation at all gives the all-ones kernel (which centres to 0).
    """
    if threshold <= 0:
        raise ValueError(f"rbf threshold must be > 0, got {threshold}")
    d2 = _sq_distances(gram)  # [..., n, n]
    flat = d2.flatten(-2)  # [..., n*n]
    scale = _median(flat)  # [...]
    scale = torch.where(scale > 0, scale, flat.mean(dim=-1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.exp(-d2 / (2 * threshold**2 * scale[..., None, None]))


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF kernel of features [n, ...] -> [n, n] (float64)."""
    return rbf_from_linear(gram_linear(x), threshold)


def center_gram_(gram: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Centre symmetric Gram matrices [..., n, n] in place and return them.

    Biased: H K H with H = I - 11^T/n.
    Unbiased (U-centering, Szekely & Rizzo 2014; Kornblith 2019 notebook ``center_gram``): zero the
    diagonal, subtract row and column means computed with the 1/(n-2) and 1/(2(n-1)) corrections,
    zero the diagonal again. Then <U(K), U(L)>_F / (n (n-3)) is Song et al.'s unbiased HSIC.
    """
    n = gram.shape[-1]
    diag = gram.diagonal(dim1=-2, dim2=-1)
    if unbiased:
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 examples per batch, got a batch of {n}")
        diag.zero_()
        means = gram.sum(dim=-1) / (n - 2)  # [..., n]
        means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    else:
        means = gram.mean(dim=-1)  # [..., n]
        means -= means.mean(dim=-1, keepdim=True) / 2
    gram.sub_(means[..., :, None]).sub_(means[..., None, :])
    if unbiased:
        diag.zero_()
    return gram


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Out-of-place :func:`center_gram_` (float64)."""
    return center_gram_(gram.to(torch.float64).clone(), unbiased)


def hsic_scale(n: int, unbiased: bool) -> float:
    """Normaliser turning <centred K, centred L>_F into the HSIC estimate."""
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


def hsic(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """HSIC estimate from two Gram matrices [n, n]: biased (Gretton 2005) or unbiased (Song 2012)."""
    n = gram_x.shape[0]
    kx, ky = center_gram(gram_x, debiased), center_gram(gram_y, debiased)
    return (kx * ky).sum() * hsic_scale(n, debiased)


def cka_from_hsic(hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor) -> torch.Tensor:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), broadcasting. A representation without any
    centred variation (HSIC(K, K) = 0: a layer that never fires) has CKA 0 with everything rather
    than NaN. Never clamped: the debiased estimate can be slightly below 0."""
    denom = torch.sqrt((hsic_xx * hsic_yy).clamp_min(0))
    return torch.where(denom > 0, hsic_xy / torch.where(denom > 0, denom, 1), torch.zeros_like(hsic_xy))


def gram(x: torch.Tensor, kernel: str = "linear", threshold: float = 1.0) -> torch.Tensor:
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold)
    raise ValueError(f"unknown CKA kernel {kernel!r}; known: {', '.join(KERNELS)}")


def cka(
    x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0
) -> float:
    """Full-data CKA between features x [n, ...] and y [n, ...] of the same n examples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both representations, got {x.shape[0]} and {y.shape[0]} rows")
    kx = center_gram_(gram(x, kernel, threshold), debiased)  # [n, n]
    ky = center_gram_(gram(y, kernel, threshold), debiased)  # [n, n]
    return float(cka_from_hsic((kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()))


class MinibatchCKA:
    """Accumulates HSIC between every pair of ``names`` over minibatches (Nguyen et al. 2021, Sec. 3.1).

    Each :meth:`update` receives the features of all layers (of every model) for the same batch of
    examples. Per layer it forms the Gram matrix in float64 from centred features, centres it
    (U-centering when ``debiased``), stacks the L centred Grams as rows of one [L, n*n] matrix, and
    adds one matrix product [L, n*n] @ [n*n, L] -> [L, L], scaled by 1/(n(n-3)) (or 1/(n-1)^2). The
    sum over batches stays on ``device`` in float64; :meth:`compute` normalises once at the end.
    """

    def __init__(
        self,
        names: Sequence[str],
        kernel: str = "linear",
        debiased: bool = True,
        threshold: float = 1.0,
        device: str | torch.device | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown CKA kernel {kernel!r}; known: {', '.join(KERNELS)}")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"CKA layer names must be non-empty and unique, got {list(names)}")
        if kernel == "rbf" and threshold <= 0:
            raise ValueError(f"rbf threshold must be > 0, got {threshold}")
        self.names = list(names)
        self.kernel, self.debiased, self.threshold = kernel, debiased, threshold
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.hsic_sum = torch.zeros(len(names), len(names), dtype=torch.float64, device=self.device)  # [L, L]
        self.num_batches = 0
        self.num_examples = 0
        self._grams: torch.Tensor | None = None  # reusable [L, n, n] buffer

    def _buffer(self, n: int) -> torch.Tensor:
        if self._grams is None or self._grams.shape[-1] != n:
            self._grams = torch.empty(len(self.names), n, n, dtype=torch.float64, device=self.device)
        return self._grams

    @torch.no_grad()
    def update(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> None:
        """Add one batch: ``features[name]`` is [n, ...] for every name, rows = the same n examples."""
        if isinstance(features, Mapping):
            missing = [k for k in self.names if k not in features]
            if missing:
                raise KeyError(f"CKA batch lacks features for layers {missing}; got {sorted(features)}")
            feats = [features[k] for k in self.names]
        else:
            feats = list(features)
            if len(feats) != len(self.names):
                raise ValueError(f"CKA batch has {len(feats)} feature tensors for {len(self.names)} layers")
        sizes = {f.shape[0] for f in feats}
        if len(sizes) != 1:
            raise ValueError(f"all layers must see the same examples; batch sizes differ: {sorted(sizes)}")
        n = sizes.pop()
        if self.debiased and n < 4:
            raise ValueError(f"debiased CKA needs at least 4 examples per batch, got a batch of {n}")
        if n < 2:
            raise ValueError(f"CKA needs at least 2 examples per batch, got {n}")
        grams = self._buffer(n)  # [L, n, n]
        for i, (name, f) in enumerate(zip(self.names, feats)):
            xc = _center_features(f, self.device)  # [n, d]
            if not torch.isfinite(xc).all():
                raise ValueError(f"features of layer {name!r} contain NaN or inf")
            torch.mm(xc, xc.T, out=grams[i])
        if self.kernel == "rbf":
            grams.copy_(rbf_from_linear(grams, self.threshold))
        center_gram_(grams, self.debiased)
        flat = grams.view(len(self.names), n * n)  # [L, n*n]
        self.hsic_sum.addmm_(flat, flat.T, alpha=hsic_scale(n, self.debiased))  # [L, L]
        self.num_batches += 1
        self.num_examples += n

    def hsic(self) -> torch.Tensor:
        """Mean HSIC over batches [L, L] (float64, CPU)."""
        if not self.num_batches:
            raise RuntimeError("MinibatchCKA.compute() before any update()")
        return (self.hsic_sum / self.num_batches).cpu()

    def compute(self) -> torch.Tensor:
        """CKA between every pair of layers [L, L] (float64, CPU)."""
        h = self.hsic()  # [L, L]
        d = h.diagonal()
        return cka_from_hsic(h, d[:, None], d[None, :])

    def degenerate(self) -> list[str]:
        """Layers whose centred kernel was zero in every batch (constant features): CKA 0 by definition."""
        d = self.hsic().diagonal()
        return [name for name, v in zip(self.names, d.tolist()) if v <= 0]

    def block(self, matrix: torch.Tensor, rows: Sequence[str], cols: Sequence[str]) -> torch.Tensor:
        """Sub-matrix [len(rows), len(cols)] of an [L, L] matrix by layer names."""
        index = {k: i for i, k in enumerate(self.names)}
        r = torch.tensor([index[k] for k in rows])
        c = torch.tensor([index[k] for k in cols])
        return matrix[r][:, c]
