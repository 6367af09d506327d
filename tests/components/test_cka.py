"""CKA properties from Kornblith et al. 2019 and Nguyen et al. 2021 (see reference/methods.md)."""

import math

import numpy as np
import pytest
import torch

from components.analysis.cka import (
    MinibatchCKA,
    center_gram,
    cka,
    gram_linear,
    gram_rbf,
    hsic,
)

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _related(n=200, d=12, seed=0, noise=0.5):
    """Two representations sharing a latent signal, with different widths."""
    g = _gen(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x = z @ torch.randn(6, d, generator=g, dtype=torch.float64) + noise * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    y = torch.tanh(z @ torch.randn(6, d + 5, generator=g, dtype=torch.float64)) + noise * torch.randn(
        n, d + 5, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one_and_cka_is_symmetric(kernel, debiased):
    x, y = _related()
    assert cka(x, x, kernel, debiased) == pytest.approx(1.0, abs=1e-12)
    xy, yx = cka(x, y, kernel, debiased), cka(y, x, kernel, debiased)
    assert xy == pytest.approx(yx, abs=1e-12)
    assert 0.2 < xy < 0.99


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(kernel, debiased):
    x, y = _related()
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=_gen(1), dtype=torch.float64))
    ref = cka(x, y, kernel, debiased)
    assert cka(x @ q, y, kernel, debiased) == pytest.approx(ref, abs=1e-10)
    assert cka(3.7 * x, 0.02 * y, kernel, debiased) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_not_invariant_to_a_general_invertible_linear_map(debiased):
    x, y = _related()
    a = torch.randn(x.shape[1], x.shape[1], generator=_gen(2), dtype=torch.float64)
    assert torch.linalg.matrix_rank(a) == x.shape[1]
    assert abs(cka(x @ a, y, "linear", debiased) - cka(x, y, "linear", debiased)) > 0.05
    assert cka(x @ a, x, "linear", debiased) < 0.95


def test_independent_features_give_zero_with_the_debiased_estimator_only():
    g = _gen(3)
    x = torch.randn(128, 256, generator=g, dtype=torch.float64)
    y = torch.randn(128, 256, generator=g, dtype=torch.float64)
    assert abs(cka(x, y, "linear", debiased=True)) < 0.05
    assert cka(x, y, "linear", debiased=False) > 0.5  # the biased estimator is pulled far from 0


def test_u_centering_equals_song_unbiased_hsic():
    """<U(K), U(L)> / (n(n-3)) is Song et al. 2012's unbiased HSIC (Eq. 5), computed directly."""
    x, y = _related(n=40)
    k, l = gram_linear(x).clone(), gram_rbf(y)
    n = k.shape[0]
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    song = (
        torch.trace(k @ l)
        + (one.T @ k @ one).item() * (one.T @ l @ one).item() / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one.T @ k @ l @ one).item()
    ) / (n * (n - 3))
    assert hsic(gram_linear(x), gram_rbf(y), debiased=True).item() == pytest.approx(song.item(), rel=1e-10)


def test_centered_gram_properties():
    x, _ = _related(n=30)
    k = gram_linear(x)
    u = center_gram(k, unbiased=True)
    assert torch.allclose(u.diagonal(), torch.zeros(30, dtype=torch.float64))
    assert torch.allclose(u.sum(0), torch.zeros(30, dtype=torch.float64), atol=1e-9)  # U-centred rows sum to 0
    h = center_gram(k, unbiased=False)
    hh = torch.eye(30, dtype=torch.float64) - 1 / 30
    assert torch.allclose(h, hh @ k @ hh, atol=1e-9)


def test_rbf_bandwidth_is_threshold_times_root_median_squared_distance():
    x = torch.randn(25, 4, generator=_gen(4), dtype=torch.float64)
    d2 = torch.cdist(x, x) ** 2
    med = float(np.median(d2.numpy()))  # numpy's median over the full n x n matrix
    for t in (0.5, 1.0):
        expected = torch.exp(-d2 / (2 * t**2 * med))
        assert torch.allclose(gram_rbf(x, t), expected, atol=1e-10)


def test_minibatch_debiased_matches_full_data_and_biased_drifts():
    x, y = _related(n=1536, d=24, noise=1.0, seed=5)
    full = cka(x, y, "linear", debiased=True)
    acc = {b: MinibatchCKA(["x", "y"], debiased=b) for b in (True, False)}
    for i in range(0, 1536, 32):
        for a in acc.values():
            a.update({"x": x[i : i + 32], "y": y[i : i + 32]})
    unbiased_mb = acc[True].compute()[0, 1].item()
    biased_mb = acc[False].compute()[0, 1].item()
    assert abs(unbiased_mb - full) < 0.02
    assert abs(biased_mb - full) > 3 * abs(unbiased_mb - full) + 0.02


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_one_batch_accumulator_equals_pairwise_cka_for_every_pair(kernel):
    x, y = _related(n=48)
    z = torch.randn(48, 7, generator=_gen(6), dtype=torch.float64)
    feats = {"x": x, "y": y, "z": z, "x2": x @ torch.randn(12, 3, generator=_gen(7), dtype=torch.float64)}
    for debiased in (True, False):
        acc = MinibatchCKA(list(feats), kernel=kernel, debiased=debiased)
        acc.update(feats)
        m = acc.compute()
        assert torch.allclose(m, m.T)
        assert torch.allclose(m.diagonal(), torch.ones(4, dtype=torch.float64))
        for i, a in enumerate(feats):
            for j, b in enumerate(feats):
                assert m[i, j].item() == pytest.approx(cka(feats[a], feats[b], kernel, debiased), abs=1e-10)
        sub = acc.block(m, ["y", "z"], ["x"])
        assert sub.shape == (2, 1) and sub[1, 0] == m[2, 0]


def test_float32_features_with_a_large_shared_mean_agree_with_float64():
    x, y = _related(n=256, seed=8)
    x32 = (x + 1e4).float()  # large shared mean; ~1e-3 relative resolution left in float32
    y32 = (y - 3e3).float()
    ref = cka(x32.double(), y32.double(), "linear", debiased=True)
    acc = MinibatchCKA(["x", "y"], debiased=True)
    for i in range(0, 256, 64):
        acc.update({"x": x32[i : i + 64], "y": y32[i : i + 64]})
    acc64 = MinibatchCKA(["x", "y"], debiased=True)
    for i in range(0, 256, 64):
        acc64.update({"x": x32[i : i + 64].double(), "y": y32[i : i + 64].double()})
    got = acc.compute()
    assert torch.isfinite(got).all()
    assert got[0, 1].item() == pytest.approx(acc64.compute()[0, 1].item(), abs=1e-9)
    assert cka(x32, y32, "linear", debiased=True) == pytest.approx(ref, abs=1e-9)
    for kernel in ("linear", "rbf"):
        assert math.isfinite(cka(x32, y32, kernel, debiased=True))
    # the data is hard: Song's formula on raw float32 Gram matrices loses the signal
    k, l = x32 @ x32.T, y32 @ y32.T
    n = 256
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1)

    def song(a, b):
        return (
            torch.trace(a @ b)
            + (one.T @ a @ one).item() * (one.T @ b @ one).item() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one.T @ a @ b @ one).item()
        ) / (n * (n - 3))

    naive = song(k, l) / math.sqrt(song(k, k) * song(l, l)) if song(k, k) * song(l, l) > 0 else float("nan")
    assert not (abs(naive - ref) < 0.05)


def test_a_layer_that_never_fires_gives_zero_not_nan():
    x, _ = _related(n=32)
    dead = torch.zeros(32, 8)
    acc = MinibatchCKA(["x", "dead"], debiased=True)
    acc.update({"x": x, "dead": dead})
    m = acc.compute()
    assert torch.isfinite(m).all()
    assert m[0, 1] == 0 and m[1, 1] == 0 and m[0, 0] == 1
    assert acc.degenerate() == ["dead"]
    assert cka(x, torch.full((32, 8), 7.0), "rbf", debiased=True) == 0.0
    assert cka(x, torch.full((32, 8), 0.1, dtype=torch.float64), "linear", debiased=True) == 0.0  # mean rounding


def test_debiased_estimator_rejects_batches_smaller_than_four():
    acc = MinibatchCKA(["x", "y"], debiased=True)
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update({"x": torch.randn(3, 5), "y": torch.randn(3, 5)})
    with pytest.raises(ValueError, match="at least 4 examples"):
        cka(torch.randn(3, 5), torch.randn(3, 5), debiased=True)
    biased = MinibatchCKA(["x", "y"], debiased=False)
    biased.update({"x": torch.randn(3, 5), "y": torch.randn(3, 5)})  # fine for the biased estimator
    assert torch.isfinite(biased.compute()).all()


def test_accumulator_input_errors_name_the_problem():
    acc = MinibatchCKA(["a", "b"])
    with pytest.raises(KeyError, match="'b'"):
        acc.update({"a": torch.randn(8, 2)})
    with pytest.raises(ValueError, match="batch sizes differ"):
        acc.update({"a": torch.randn(8, 2), "b": torch.randn(9, 2)})
    with pytest.raises(ValueError, match="layer 'b'.*NaN"):
        acc.update({"a": torch.randn(8, 2), "b": torch.full((8, 2), float("nan"))})
    with pytest.raises(ValueError, match="unknown CKA kernel"):
        MinibatchCKA(["a"], kernel="cosine")


def test_heatmap_labels_axes_with_layer_names_and_has_a_colour_bar(tmp_path):
    from components.analysis.heatmap import plot_cka_grid, plot_cka_heatmap
    from pipelines.layout import write_figure

    m = torch.tensor([[1.0, 0.5, -0.02], [0.5, 1.0, 0.3]])
    fig = plot_cka_heatmap(m, ["blocks.0", "blocks.1"], ["layer1.0", "layer2.0", "layer3.0"], "ViT", "CNN")
    ax, cbar_ax = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocks.0", "blocks.1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer1.0", "layer2.0", "layer3.0"]
    assert ax.get_xlabel() == "CNN" and cbar_ax.get_ylabel() == "CKA"
    assert ax.images[0].get_clim()[0] < -0.019  # values are drawn as they are, not clamped to [0, 1]
    path = write_figure(fig, tmp_path / "h.png", dpi=120)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="does not match 2 row and 2 column names"):
        plot_cka_heatmap(m, ["a", "b"], ["c", "d"])
    grid = plot_cka_grid(
        [
            {"matrix": m, "rows": ["a", "b"], "cols": ["c", "d", "e"], "at": (0, 1)},
            {"matrix": m[:, :2], "rows": ["a", "b"], "cols": ["c", "d"], "at": (1, 1)},
        ]
    )
    assert sum(ax.axison for ax in grid.axes[:-1]) == 2  # the unused grid cells are blank
    write_figure(grid, tmp_path / "g.png", dpi=120)


def test_low_precision_features_with_small_variation_are_not_mistaken_for_constant():
    """bfloat16 keeps ~3 significant digits: features varying by 5 % around a large value are still a
    representation (only exactly constant features count as a layer that never fires)."""
    x, y = _related(n=64, seed=9)
    xb = (100 + 5 * x / x.abs().max()).bfloat16()
    acc = MinibatchCKA(["x", "y"], debiased=True)
    acc.update({"x": xb, "y": y})
    assert acc.degenerate() == []
    assert acc.compute()[0, 1].item() == pytest.approx(cka(xb.double(), y, "linear", True), abs=1e-12)
    assert acc.compute()[0, 1].item() > 0.2
    const = MinibatchCKA(["c", "y"], debiased=True)
    const.update({"c": torch.full((64, 3), 100.3, dtype=torch.bfloat16), "y": y})
    assert const.degenerate() == ["c"]
