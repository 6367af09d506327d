"""CKA heatmaps in the layout of Raghu et al. 2021 (Fig. 1-2): layers of one model on the y axis
(first layer at the bottom), layers of the other on the x axis, one colour bar for CKA.

Values are drawn as they are, never clamped: the debiased estimate can dip slightly below 0, and
the colour range stretches to show it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _color_range(m: np.ndarray) -> tuple[float, float]:
    return min(0.0, float(np.nanmin(m))), max(1.0, float(np.nanmax(m)))


def _draw(ax, m: np.ndarray, rows: Sequence[str], cols: Sequence[str], row_label: str, col_label: str, title: str):
    vmin, vmax = _color_range(m)
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), list(cols), rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    return im


def plot_cka_heatmap(
    matrix: torch.Tensor | np.ndarray,
    row_names: Sequence[str],
    col_names: Sequence[str],
    row_label: str = "",
    col_label: str = "",
    title: str = "CKA",
):
    """One heatmap [len(row_names), len(col_names)] with layer names on both axes and a colour bar."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (len(row_names), len(col_names)):
        raise ValueError(
            f"CKA matrix of shape {m.shape} does not match {len(row_names)} row and {len(col_names)} column names"
        )
    side = 2.2 + 0.28 * max(len(row_names), len(col_names))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    im = _draw(ax, m, row_names, col_names, row_label, col_label, title)
    fig.colorbar(im, ax=ax, label="CKA")
    return fig


def plot_cka_grid(panels: Sequence[dict], title: str = "CKA"):
    """Several heatmaps on one shared colour scale; each panel: {"matrix", "rows", "cols", "row_label",
    "col_label", "title"} and optionally "at": (grid row, grid column), e.g. the upper triangle of a
    models x models grid. Without "at", panels fill a grid of up to 4 columns in order."""
    if not panels:
        raise ValueError("plot_cka_grid needs at least one panel")
    if all("at" in p for p in panels):
        places = [tuple(p["at"]) for p in panels]
        nrows, ncols = max(r for r, _ in places) + 1, max(c for _, c in places) + 1
    else:
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        places = [divmod(i, ncols) for i in range(len(panels))]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols + 1, 3.4 * nrows), constrained_layout=True, squeeze=False
    )
    lo = min(_color_range(np.asarray(p["matrix"], dtype=np.float64))[0] for p in panels)
    hi = max(_color_range(np.asarray(p["matrix"], dtype=np.float64))[1] for p in panels)
    im = None
    for (r, c), p in zip(places, panels):
        im = _draw(
            axes[r, c],
            np.asarray(p["matrix"], dtype=np.float64),
            p["rows"],
            p["cols"],
            p.get("row_label", ""),
            p.get("col_label", ""),
            p.get("title", ""),
        )
        im.set_clim(lo, hi)
    used = set(places)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r, c].axis("off")
    fig.colorbar(im, ax=axes, label="CKA", shrink=0.6)
    fig.suptitle(title)
    return fig
