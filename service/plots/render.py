"""Plots drawn with matplotlib's object API on the Agg canvas: plain data in, PNG or SVG bytes out.

Pure functions: no database, no web framework, no files. Each plot is described by a frozen
dataclass of numpy arrays and labels (built by :mod:`service.plots.service`); :func:`render` draws
it on a fresh :class:`matplotlib.figure.Figure` (never pyplot, whose global state machine is not
thread-safe) and saves it. Rendering is serialised by a process-wide lock: matplotlib keeps
caches (text layout, fonts, mathtext) shared between figures, and rendering is pure Python under
the GIL anyway, so threads gain nothing by drawing at once.

Every plot has a title, axis labels (with units), a legend where colours or markers mean
something, and a fixed size in pixels (:data:`FIGURE_PIXELS`). Colours are colour-blind safe:
Okabe–Ito's qualitative palette, then Paul Tol's "muted" one (16 colours in all), then cividis
sampled evenly for more clusters; heatmaps use cividis. Colour is never the only cue: bars and
tiles carry the cluster number, the projection varies marker shapes.

matplotlib itself is imported on the first render, not with the module: the API starts without
paying for it. SVG output keeps text as text (``svg.fonttype = none``: searchable, smaller) and
uses a fixed ``svg.hashsalt``, so the same plot gives the same bytes.
"""

from __future__ import annotations

import io
import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.plots.states import DC, GRID_COLUMNS, GRID_ROWS, STATE_NAMES, TILES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import ColorType

Format = Literal["png", "svg"]
MEDIA_TYPES: dict[Format, str] = {"png": "image/png", "svg": "image/svg+xml"}
DPI = 100
#: Width and height in pixels of each kind of plot (PNG; the SVG's size in px is the same).
FIGURE_PIXELS: dict[str, tuple[int, int]] = {
    "sizes": (960, 600),
    "centroids": (960, 600),
    "projection": (960, 640),
    "states": (1100, 640),
    "elbow": (900, 720),
}
SOFTWARE = "Centroid (matplotlib, Agg)"

#: Okabe & Ito's colour-blind-safe palette, without black (kept for outlines and text).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
#: Paul Tol's colour-blind-safe "muted" palette, ordered to stand apart from Okabe–Ito's.
TOL_MUTED = ("#332288", "#CC6677", "#999933", "#882255", "#88CCEE", "#DDCC77", "#117733", "#AA4499", "#44AA99")
QUALITATIVE = OKABE_ITO + TOL_MUTED
NO_DATA = "#E6E6E6"
SEQUENTIAL = "cividis"
#: Marker shapes of the projection's points, cycled with the colours.
MARKERS = ("o", "s", "^", "D", "v", "P")
LINE_BLUE, LINE_GREEN, MARK_ORANGE, MARK_VERMILLION = "#0072B2", "#009E73", "#E69F00", "#D55E00"

#: Plots with more clusters than this leave out per-cluster text (bar values, tick per cluster).
LABELLED_CLUSTERS = 40
#: A heatmap with more cells than this has no value written in each cell.
LABELLED_CELLS = 150
#: Legends list at most this many clusters.
LEGEND_CLUSTERS = 20

_LOCK = threading.Lock()
_configured = False
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --- what each plot shows ------------------------------------------------------------------------


@dataclass(frozen=True)
class SizesPlot:
    """Points per cluster."""

    model: str  # how the title names the model
    sizes: np.ndarray  # (k,) counts
    source: str  # where the counts come from


@dataclass(frozen=True)
class CentroidsPlot:
    """Centroids as a features × clusters heatmap."""

    model: str
    features: list[str]
    centroids: np.ndarray  # (k, d), in the units ``units`` names
    original_units: bool  # False: the model's own (possibly scaled) units
    units: str  # a sentence about the units, for the subtitle


@dataclass(frozen=True)
class ProjectionPlot:
    """Rows projected to two principal components, coloured by cluster, centroids marked."""

    model: str
    k: int
    points: np.ndarray  # (n, 2)
    labels: np.ndarray  # (n,) cluster of each point
    centroids: np.ndarray  # (k, 2)
    explained: tuple[float, float]  # share of the variance each component explains
    sample: str  # "5,000 of 10,000,000 rows (...)"
    note: str = ""  # e.g. why there is no second component


@dataclass(frozen=True)
class StatesPlot:
    """A tile-grid map of the US states coloured by cluster."""

    model: str
    k: int
    clusters: dict[str, int]  # postal code -> cluster


@dataclass(frozen=True)
class ElbowPlot:
    """A sweep's msd and silhouette against k, the recommended k marked."""

    sweep: str
    ks: np.ndarray  # (n,) increasing
    msd: np.ndarray  # (n,)
    silhouette: np.ndarray  # (n,), NaN where there is none
    recommended: int
    elbow_k: int | None
    best_silhouette_k: int | None
    evaluated_on: str  # "the training data" / "the test dataset"


Plot = SizesPlot | CentroidsPlot | ProjectionPlot | StatesPlot | ElbowPlot


def kind_of(plot: Plot) -> str:
    """The plot's kind, as in the URL (``sizes``, ``centroids``, ...)."""
    return {
        SizesPlot: "sizes",
        CentroidsPlot: "centroids",
        ProjectionPlot: "projection",
        StatesPlot: "states",
        ElbowPlot: "elbow",
    }[type(plot)]


# --- rendering -------------------------------------------------------------------------------------


def render(plot: Plot, fmt: Format) -> bytes:
    """The plot as PNG or SVG bytes, :data:`FIGURE_PIXELS` in size."""
    with _LOCK:
        _configure()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        width, height = FIGURE_PIXELS[kind_of(plot)]
        figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        title = _draw(figure, plot)
        buffer = io.BytesIO()
        metadata: dict[str, str | None] = (
            {"Title": title, "Software": SOFTWARE}
            if fmt == "png"
            else {"Title": title, "Creator": SOFTWARE, "Date": None}
        )
        figure.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata, facecolor="white")
        return buffer.getvalue()


def _configure() -> None:
    """Once per process: deterministic SVG ids, and text kept as text in SVG."""
    global _configured
    if not _configured:
        import matplotlib

        matplotlib.rcParams["svg.hashsalt"] = "centroid"
        matplotlib.rcParams["svg.fonttype"] = "none"
        _configured = True


def _draw(figure: Figure, plot: Plot) -> str:
    if isinstance(plot, SizesPlot):
        return _sizes(figure, plot)
    if isinstance(plot, CentroidsPlot):
        return _centroids(figure, plot)
    if isinstance(plot, ProjectionPlot):
        return _projection(figure, plot)
    if isinstance(plot, StatesPlot):
        return _states(figure, plot)
    return _elbow(figure, plot)


# --- helpers ---------------------------------------------------------------------------------------


def plain(text: str, limit: int = 60) -> str:
    """User text safe to draw: control characters as spaces, at most ``limit`` characters, and no
    mathtext (a ``$`` is drawn as a dollar sign)."""
    text = _CONTROL.sub(" ", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def cluster_colors(k: int) -> list[str]:
    """One colour per cluster: :data:`QUALITATIVE` for up to 16 clusters, cividis sampled beyond."""
    if k <= len(QUALITATIVE):
        return list(QUALITATIVE[:k])
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colormap = colormaps[SEQUENTIAL]
    return [to_hex(colormap(i / (k - 1))) for i in range(k)]


def ink(color: ColorType) -> str:
    """Black or white, whichever reads better on ``color`` (WCAG relative luminance)."""
    from matplotlib.colors import to_rgb

    channels = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(color)]
    luminance = 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]
    return "black" if luminance > 0.18 else "white"


def number(value: float) -> str:
    """A value for a label: thousands separated, about four significant digits."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _counts_axis(axes: Axes) -> None:
    """Whole numbers on the y axis, thousands separated."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))


def _integer_ticks(axes: Axes, which: Literal["x", "y"], count: int) -> None:
    from matplotlib.ticker import MaxNLocator

    axis = axes.xaxis if which == "x" else axes.yaxis
    if count <= LABELLED_CLUSTERS:
        axis.set_ticks(range(count))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


# --- the plots -------------------------------------------------------------------------------------


def _sizes(figure: Figure, plot: SizesPlot) -> str:
    sizes = np.asarray(plot.sizes, dtype=np.int64)
    k = len(sizes)
    axes = figure.subplots()
    bars = axes.bar(np.arange(k), sizes, color=cluster_colors(k), edgecolor="#333333", linewidth=0.6 if k <= 100 else 0)
    if k <= LABELLED_CLUSTERS:
        axes.bar_label(bars, labels=[f"{int(v):,}" for v in sizes], padding=2, fontsize=8)
    _integer_ticks(axes, "x", k)
    _counts_axis(axes)
    axes.set_xlabel("cluster")
    axes.set_ylabel("points (rows closest to the cluster's centroid)")
    axes.margins(y=0.12)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    total = int(sizes.sum())
    largest = int(np.argmax(sizes)) if k else 0
    share = f"; largest: cluster {largest}, {sizes[largest] / total:.0%}" if total else ""
    axes.set_title(f"{total:,} points in {k} clusters ({plain(plot.source, 90)}){share}", fontsize=9)
    title = f"Points per cluster: {plain(plot.model)}"
    figure.suptitle(title)
    return title


def _centroids(figure: Figure, plot: CentroidsPlot) -> str:
    values = np.asarray(plot.centroids, dtype=np.float64).T  # features x clusters
    d, k = values.shape
    low = values.min(axis=1, keepdims=True)
    high = values.max(axis=1, keepdims=True)
    span = high - low
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), 0.5)
    axes = figure.subplots()
    image = axes.imshow(relative, cmap=SEQUENTIAL, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.9)
    colorbar.set_label("within each feature: 0 = lowest centroid, 1 = highest")
    _integer_ticks(axes, "x", k)
    if d <= LABELLED_CLUSTERS:
        axes.set_yticks(
            range(d),
            [
                f"{plain(name, 40)}  [{number(low[i, 0])} … {number(high[i, 0])}]"
                for i, name in enumerate(plot.features)
            ],
            fontsize=8 if d > 12 else 9,
        )
    else:
        axes.set_yticks([])
    if d * k <= LABELLED_CELLS:
        from matplotlib import colormaps

        colormap = colormaps[SEQUENTIAL]
        size = 8 if d * k <= 60 else 6
        for row in range(d):
            for column in range(k):
                axes.text(
                    column,
                    row,
                    number(float(values[row, column])),
                    ha="center",
                    va="center",
                    fontsize=size,
                    color=ink(colormap(float(relative[row, column]))),
                )
    units = "original units" if plot.original_units else "the model's units"
    axes.set_xlabel("cluster")
    axes.set_ylabel(f"feature  [range over the centroids, {units}]")
    axes.set_title(plain(plot.units, 140), fontsize=9)
    title = f"Centroids of {plain(plot.model)}, in {units}"
    figure.suptitle(title)
    return title


def _projection(figure: Figure, plot: ProjectionPlot) -> str:
    from matplotlib.lines import Line2D

    axes = figure.subplots()
    colors = np.array(cluster_colors(plot.k))
    points = np.asarray(plot.points, dtype=np.float64)
    labels = np.asarray(plot.labels, dtype=np.int64)
    size = 36 if len(points) <= 200 else 14 if len(points) <= 2000 else 7
    for shape, marker in enumerate(MARKERS):  # one call per marker shape, whatever k is
        mine = labels % len(MARKERS) == shape
        if mine.any():
            axes.scatter(
                points[mine, 0],
                points[mine, 1],
                c=colors[labels[mine]],
                marker=marker,
                s=size,
                alpha=0.75,
                linewidths=0,
                rasterized=True,  # in SVG, thousands of points become one embedded image
            )
    centers = np.asarray(plot.centroids, dtype=np.float64)
    axes.scatter(
        centers[:, 0], centers[:, 1], marker="X", s=170, c=colors, edgecolors="black", linewidths=1.3, zorder=3
    )
    if plot.k <= LABELLED_CLUSTERS:
        for cluster, (x, y) in enumerate(centers):
            axes.annotate(
                str(cluster), (x, y), xytext=(7, 7), textcoords="offset points", fontsize=8, fontweight="bold"
            )
    shown = min(plot.k, LEGEND_CLUSTERS)
    handles = [
        Line2D([], [], linestyle="", marker=MARKERS[c % len(MARKERS)], color=colors[c], label=f"cluster {c}")
        for c in range(shown)
    ]
    if plot.k > shown:
        handles.append(Line2D([], [], linestyle="", label=f"… and {plot.k - shown} more clusters"))
    handles.append(
        Line2D(
            [], [], linestyle="", marker="X", markersize=10, markerfacecolor="white", color="black", label="centroid"
        )
    )
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="cluster", frameon=False)
    first, second = plot.explained
    axes.set_xlabel(f"first principal component ({first:.0%} of the variance; model units)")
    axes.set_ylabel(
        f"second principal component ({second:.0%} of the variance; model units)"
        if not plot.note
        else f"second principal component ({plain(plot.note, 50)})"
    )
    axes.grid(alpha=0.25)
    axes.set_axisbelow(True)
    axes.set_title(f"{plot.sample}; PCA fitted on these rows", fontsize=9)
    title = f"Training data projected to 2-D (PCA): {plain(plot.model)}"
    figure.suptitle(title)
    return title


def _states(figure: Figure, plot: StatesPlot) -> str:
    from matplotlib.patches import Patch, Rectangle

    axes = figure.subplots()
    colors = cluster_colors(plot.k)
    gap = 0.08
    for code, (row, column) in TILES.items():
        cluster = plot.clusters.get(code)
        if code == DC and cluster is None:
            continue  # the District is drawn only when the data has it
        face = colors[cluster] if cluster is not None else NO_DATA
        axes.add_patch(
            Rectangle((column + gap / 2, row + gap / 2), 1 - gap, 1 - gap, facecolor=face, edgecolor="#555555")
        )
        text = ink(face)
        axes.text(column + 0.5, row + 0.42, code, ha="center", va="center", fontsize=11, fontweight="bold", color=text)
        axes.text(
            column + 0.5,
            row + 0.76,
            "–" if cluster is None else str(cluster),
            ha="center",
            va="center",
            fontsize=7,
            color=text,
        )
    axes.set_xlim(-0.1, GRID_COLUMNS + 0.1)
    axes.set_ylim(GRID_ROWS + 0.1, -0.1)
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_xlabel(
        "One square per state, placed roughly where it is (not to scale): its postal code, and its cluster below"
    )
    counts: dict[int, int] = {}
    for cluster in plot.clusters.values():
        counts[cluster] = counts.get(cluster, 0) + 1
    present = sorted(counts)
    handles = [
        Patch(facecolor=colors[c], edgecolor="#555555", label=f"cluster {c}: {counts[c]} state{'s' * (counts[c] > 1)}")
        for c in present[:LEGEND_CLUSTERS]
    ]
    if len(present) > LEGEND_CLUSTERS:
        handles.append(Patch(facecolor="white", edgecolor="white", label=f"… {len(present) - LEGEND_CLUSTERS} more"))
    states = [code for code in TILES if code != DC]
    missing = [code for code in states if code not in plot.clusters]
    if missing:
        handles.append(Patch(facecolor=NO_DATA, edgecolor="#555555", label=f"no data: {len(missing)}"))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="cluster", frameon=False)
    shown = len(states) - len(missing)
    dc = " and DC" if DC in plot.clusters else ""
    axes.set_title(
        f"{shown} of the {len(STATE_NAMES) - 1} states{dc} in the training data, {len(present)} of {plot.k} clusters",
        fontsize=9,
    )
    title = f"Clusters by state: {plain(plot.model)}"
    figure.suptitle(title)
    return title


def _elbow(figure: Figure, plot: ElbowPlot) -> str:
    top, bottom = figure.subplots(2, 1, sharex=True)
    ks = np.asarray(plot.ks, dtype=np.float64)
    msd = np.asarray(plot.msd, dtype=np.float64)
    silhouette = np.asarray(plot.silhouette, dtype=np.float64)
    top.plot(ks, msd, marker="o", color=LINE_BLUE, label="msd")
    if plot.elbow_k is not None and plot.elbow_k in plot.ks:
        at = int(np.flatnonzero(plot.ks == plot.elbow_k)[0])
        top.plot(
            [ks[at]],
            [msd[at]],
            linestyle="",
            marker="D",
            markersize=12,
            markerfacecolor="none",
            markeredgecolor=MARK_ORANGE,
            markeredgewidth=2,
            label=f"elbow of the msd curve: k = {plot.elbow_k}",
        )
    if np.isfinite(silhouette).any():
        bottom.plot(ks, silhouette, marker="s", color=LINE_GREEN, label="silhouette")
    else:
        bottom.text(
            0.5,
            0.5,
            "no silhouette: every sample held fewer than 2 clusters",
            transform=bottom.transAxes,
            ha="center",
            va="center",
        )
    if plot.best_silhouette_k is not None and plot.best_silhouette_k in plot.ks:
        at = int(np.flatnonzero(plot.ks == plot.best_silhouette_k)[0])
        bottom.plot(
            [ks[at]],
            [silhouette[at]],
            linestyle="",
            marker="D",
            markersize=12,
            markerfacecolor="none",
            markeredgecolor=MARK_ORANGE,
            markeredgewidth=2,
            label=f"best silhouette: k = {plot.best_silhouette_k}",
        )
    for axes in (top, bottom):
        axes.axvline(
            plot.recommended,
            color=MARK_VERMILLION,
            linestyle="--",
            linewidth=1.6,
            label=f"recommended k = {plot.recommended}",
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
    top.set_ylabel("msd: mean squared distance\nto the closest centroid\n(squared model units)")
    bottom.set_ylabel("silhouette\n(−1 to 1, higher is better;\nunitless)")
    bottom.set_xlabel("k (number of clusters)")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(f"msd and silhouette against k, evaluated on {plain(plot.evaluated_on)}", fontsize=9)
    title = f"Which k? Sweep {plain(plot.sweep)}"
    figure.suptitle(title)
    return title
