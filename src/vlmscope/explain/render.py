"""Heat-map overlays and line plots with matplotlib's Agg canvas (no pyplot: no global backend state is touched).

Maps are drawn on the **original** image: a grid that covers the fraction box `region` of the image (the part
that survived the processor's resize and centre crop) is stretched over exactly that box, bicubically
interpolated, and the rest of the image is left uncovered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Region = tuple[float, float, float, float]


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def color_limits(maps: Sequence[np.ndarray], scale: str) -> list[tuple[float, float]]:
    """(vmin, vmax) per map. Attention and CAMs are non-negative, so the scale starts at 0 (or the minimum if
    negative) and ends at the maximum over all maps ("shared": maps are comparable) or of each map ("per-map")."""
    if scale not in ("shared", "per-map"):
        from vlmscope.errors import InputError

        raise InputError(f"unknown colour scale {scale!r}: use shared or per-map")

    def limits(values: np.ndarray) -> tuple[float, float]:
        lo = min(0.0, float(np.nanmin(values))) if values.size else 0.0
        hi = float(np.nanmax(values)) if values.size else 1.0
        return lo, hi if hi > lo else lo + 1e-12

    if scale == "shared":
        both = limits(np.concatenate([np.ravel(m) for m in maps])) if maps else (0.0, 1.0)
        return [both] * len(maps)
    return [limits(np.asarray(m)) for m in maps]


def draw_overlay(ax: Any, image: Any, heat: np.ndarray, region: Region, vmin: float, vmax: float,
                 title: str | None = None, cmap: str = "jet", alpha: float = 0.5) -> Any:
    """Draw `image` and the 2-D `heat` map stretched over `region` of it; returns the heat-map artist."""
    width, height = image.size
    ax.imshow(np.asarray(image), extent=(0, width, height, 0))
    x0, y0, x1, y1 = region
    artist = ax.imshow(np.asarray(heat, dtype=np.float32), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                       interpolation="bicubic", extent=(x0 * width, x1 * width, y1 * height, y0 * height))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return artist


def save_overlay(path: str | Path, image: Any, heat: np.ndarray, region: Region, vmin: float, vmax: float,
                 title: str | None = None) -> Path:
    fig = new_figure(4.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    artist = draw_overlay(ax, image, heat, region, vmin, vmax, title)
    fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def overlay_grid(image: Any, heats: Sequence[np.ndarray], region: Region, titles: Sequence[str],
                 limits: Sequence[tuple[float, float]], columns: int = 6, suptitle: str | None = None) -> Any:
    """One figure with a panel per map (e.g. one per generated token), each titled; returns the Figure."""
    n = max(1, len(heats))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = new_figure(2.6 * cols, 2.8 * rows + (0.4 if suptitle else 0))
    artist = None
    for i, (heat, title, (vmin, vmax)) in enumerate(zip(heats, titles, limits)):
        ax = fig.add_subplot(rows, cols, i + 1)
        artist = draw_overlay(ax, image, heat, region, vmin, vmax, title)
    if artist is not None and len({tuple(lim) for lim in limits}) == 1:
        # One shared scale: one colour bar for the whole figure.
        fig.colorbar(artist, ax=fig.axes, fraction=0.02, pad=0.02)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def line_plot(path: str | Path, series: dict[str, Sequence[float]], title: str, ylabel: str,
              log: bool = False) -> Path:
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("symlog", linthresh=1e-12)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def safe_label(token: str, limit: int = 24) -> str:
    """A token as a plot title: visible whitespace, bounded length."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    text = text if text.strip() else repr(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
