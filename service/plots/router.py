"""HTTP routes of plots: a model's (sizes, centroids, projection, states) and a sweep's elbow.

The format is chosen by an extension on the kind (``sizes.png``, ``sizes.svg``) or by ``Accept``
(``image/png``, ``image/svg+xml``; PNG by default); anything else is 406. Models are immutable, and
so is a Completed sweep's elbow: every plot is answered with a strong ETag and ``Cache-Control``
(304 on ``If-None-Match``), and rendered bytes are kept in a small in-process LRU keyed by what
identifies them (model id, kind, format), so a repeated request is not drawn again. The model or
sweep is still looked up on every request (a deleted one is 404 at once). Loading and drawing run
in a worker thread, never on the event loop, and no database session is held while drawing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any, cast

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from schemas.common import error_responses
from service.deps import AppState, app_state, db_session
from service.errors import NotAcceptable
from service.http_cache import (
    Rendered,
    RenderedCache,
    cache_headers,
    etag_matches,
    if_none_match,
    openapi_cache_headers,
    openapi_not_modified,
    strong_etag,
)
from service.models.service import batch_rows
from service.plots.render import MEDIA_TYPES, Format, render
from service.plots.service import ModelPlotKind, PlotService, sweep_version

router = APIRouter(tags=["plots"])

#: Rendered plots kept per process (bounded by bytes and entries; least recently used goes first).
PLOT_CACHE = RenderedCache(max_bytes=32 * 1024 * 1024, max_entries=512)
_FORMATS: tuple[Format, ...] = ("png", "svg")


class ModelPlotName(StrEnum):
    """A model plot's kind, optionally with the format as an extension."""

    SIZES = "sizes"
    SIZES_PNG = "sizes.png"
    SIZES_SVG = "sizes.svg"
    CENTROIDS = "centroids"
    CENTROIDS_PNG = "centroids.png"
    CENTROIDS_SVG = "centroids.svg"
    PROJECTION = "projection"
    PROJECTION_PNG = "projection.png"
    PROJECTION_SVG = "projection.svg"
    STATES = "states"
    STATES_PNG = "states.png"
    STATES_SVG = "states.svg"


class SweepPlotName(StrEnum):
    """A sweep plot's kind, optionally with the format as an extension."""

    ELBOW = "elbow"
    ELBOW_PNG = "elbow.png"
    ELBOW_SVG = "elbow.svg"


_IMAGE_CONTENT: dict[str, Any] = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/svg+xml": {"schema": {"type": "string"}},
}
_HEADERS: dict[str, Any] = {
    **openapi_cache_headers(),
    "Vary": {"description": "`Accept`: the same URL answers PNG or SVG.", "schema": {"type": "string"}},
}


def _plot_responses(ok: str, conflict: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses``: the image (PNG or SVG), 304, and the errors."""
    errors = error_responses(404, 406, 409, 422)
    errors[409] = {**errors[409], "description": conflict}
    errors[406] = {
        **errors[406],
        "description": "`Accept` allows neither `image/png` nor `image/svg+xml` (or not "
        "the format the extension names)",
    }
    return {
        200: {"description": ok, "content": _IMAGE_CONTENT, "headers": _HEADERS},
        304: openapi_not_modified(),
        **errors,
    }


# --- content negotiation ------------------------------------------------------------------------------


def choose_format(name: str, accept: str | None) -> tuple[str, Format]:
    """The plot's kind and format: the extension's, else the best ``Accept`` allows (PNG by default).

    ``Accept`` is read as RFC 9110 says: each format takes the quality of the most specific range
    naming it (``image/png``, then ``image/*``, then ``*/*``); q=0 refuses it. With an extension,
    ``Accept`` must allow that format. Nothing allowed: 406 naming what is offered.
    """
    kind, _, extension = name.partition(".")
    offered: tuple[Format, ...] = ("png",) if extension == "png" else ("svg",) if extension == "svg" else _FORMATS
    if not accept or not accept.strip():
        return kind, offered[0]
    ranges = _ranges(accept)
    best: tuple[float, Format] | None = None
    for fmt in offered:
        quality = _quality(ranges, MEDIA_TYPES[fmt])
        if quality > 0 and (best is None or quality > best[0]):
            best = (quality, fmt)
    if best is None:
        types = [MEDIA_TYPES[fmt] for fmt in offered]
        raise NotAcceptable(
            f"cannot respond with {accept[:200]!r}; this plot is available as {', '.join(types)}",
            details={"acceptable": types},
        )
    return kind, best[1]


def _ranges(accept: str) -> dict[str, float]:
    """Media range -> quality, from an ``Accept`` header (the first mention of a range wins)."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        pieces = [piece.strip() for piece in part.split(";")]
        media = pieces[0].lower()
        if not media:
            continue
        quality = 1.0
        for parameter in pieces[1:]:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                quality = min(max(quality, 0.0), 1.0) if math.isfinite(quality) else 0.0
        ranges.setdefault(media, quality)
    return ranges


def _quality(ranges: dict[str, float], media: str) -> float:
    for candidate in (media, media.split("/", 1)[0] + "/*", "*/*"):
        if candidate in ranges:
            return ranges[candidate]
    return 0.0


# --- answering ------------------------------------------------------------------------------------------


@contextmanager
def _plots(state: AppState) -> Iterator[PlotService]:
    """A plot service on its own database session, closed when the block ends."""
    with contextmanager(db_session)(state) as session:
        yield PlotService(session, state.store, rows_per_batch=batch_rows(state.settings.parquet_row_group_rows))


def _headers(etag: str, filename: str) -> dict[str, str]:
    return {**cache_headers(etag), "Vary": "Accept", "Content-Disposition": f'inline; filename="{filename}"'}


def _image(rendered: Rendered, filename: str) -> Response:
    return Response(rendered.body, media_type=rendered.media_type, headers=_headers(rendered.etag, filename))


def _not_modified(etag: str, filename: str) -> Response:
    return Response(status_code=304, headers=_headers(etag, filename))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100]


def _model_plot(state: AppState, model_id: str, kind: ModelPlotKind, fmt: Format, validators: str | None) -> Response:
    """In a worker thread: 304, the cached bytes, or load (with a session) then draw (without)."""
    with _plots(state) as plots:
        row = plots.model(model_id)
        version = plots.model_version(row, kind)
        model_key = row.id
    etag = strong_etag("plot", version, fmt)
    filename = f"{_safe(model_key)}-{kind}.{fmt}"
    if etag_matches(validators, etag):
        return _not_modified(etag, filename)
    key = ("model-plot", version, fmt)
    rendered = PLOT_CACHE.get(key, 0)
    if rendered is None:
        with PLOT_CACHE.flight(key):  # one drawing per key at a time; the others find it cached
            rendered = PLOT_CACHE.get(key, 0)
            if rendered is None:
                with _plots(state) as plots:
                    plot = plots.model_plot(plots.model(model_id), kind)
                rendered = Rendered(etag, render(plot, fmt), 0, MEDIA_TYPES[fmt])
                PLOT_CACHE.put(key, rendered)
    return _image(rendered, filename)


def _sweep_plot(state: AppState, name: str, fmt: Format, validators: str | None) -> Response:
    with _plots(state) as plots:
        sweep = plots.sweep(name)
        version = sweep_version(sweep)
        etag = strong_etag("plot", version, "elbow", fmt)
        filename = f"{_safe(sweep.name)}-elbow.{fmt}"
        if etag_matches(validators, etag):
            return _not_modified(etag, filename)
        key = ("sweep-plot", version, fmt)
        rendered = PLOT_CACHE.get(key, 0)
        if rendered is not None:
            return _image(rendered, filename)
        plot = plots.elbow(sweep)
    with PLOT_CACHE.flight(key):
        rendered = PLOT_CACHE.get(key, 0)
        if rendered is None:
            rendered = Rendered(etag, render(plot, fmt), 0, MEDIA_TYPES[fmt])
            PLOT_CACHE.put(key, rendered)
    return _image(rendered, filename)


# --- routes -------------------------------------------------------------------------------------------

_KIND_DESCRIPTION = (
    "`sizes`, `centroids`, `projection` or `states`; `.png` or `.svg` appended chooses the format "
    "(without it, `Accept` does, PNG by default)."
)


@router.get(
    "/models/{model_id}/plots/{kind}",
    response_class=Response,
    summary="A model as a picture: cluster sizes, centroids, a 2-D projection, or a map of US states",
    responses=_plot_responses(
        "The plot, PNG or SVG (by the extension, else by `Accept`). Title, axis labels with units, a legend where "
        "colours mean something; colour-blind-safe colours.",
        "The plot cannot be drawn for this model: an imported model has no training data (for `projection`, "
        "`states`, and `sizes` without stored sizes); for `states`, the training dataset's keys are not US state "
        "names or postal codes (or repeat a state); the training dataset is in S3 (Centroid holds no copy). The "
        "message says which.",
    ),
)
async def get_model_plot(
    model_id: str,
    kind: Annotated[ModelPlotName, Path(description=_KIND_DESCRIPTION)],
    request: Request,
) -> Response:
    """- `sizes`: a bar chart of the points per cluster (the model's stored `cluster_sizes`; a model
      without them has its training dataset assigned, one pass).
    - `centroids`: a heatmap of the centroids, features × clusters, in **original units** when the
      training recipe's min-max or z-score scalings can be undone (else in the model's units, and
      the title says so). Each feature is coloured over its own range across the clusters (cividis),
      its range is in the label, and small models have every value written in its cell.
    - `projection`: the training rows projected on their first two principal components
      (scikit-learn's PCA, fitted on the rows shown), coloured by cluster, centroids marked. At
      most 5,000 rows: larger datasets are sampled with a fixed seed from at most 16 row groups,
      read without loading the file, and the plot says how many rows it shows of how many.
    - `states`: a tile-grid map of the 50 US states (and DC when present) coloured by cluster,
      for a model whose training dataset is keyed by state names or postal codes (the workshop's
      picture); 409 for other keys.

    The model is immutable, so its plots are too: an `ETag` and `Cache-Control` come with every
    plot, and `If-None-Match` gives 304. Rendered plots are kept in memory, so asking again costs
    no drawing."""
    plot_kind, fmt = choose_format(kind.value, request.headers.get("accept"))
    state = app_state(request)
    validators = if_none_match(request.headers)
    return await run_in_threadpool(_model_plot, state, model_id, cast(ModelPlotKind, plot_kind), fmt, validators)


@router.get(
    "/sweeps/{name}/plots/{kind}",
    response_class=Response,
    summary="A sweep's elbow plot: msd and silhouette against k, the recommended k marked",
    responses=_plot_responses(
        "The elbow plot, PNG or SVG (by the extension, else by `Accept`).",
        "The sweep is not `Completed` (yet): its results exist once it is.",
    ),
)
async def get_sweep_plot(
    name: str,
    kind: Annotated[SweepPlotName, Path(description="`elbow`; `elbow.png` or `elbow.svg` choose the format.")],
    request: Request,
) -> Response:
    """Two panels sharing the k axis: the mean squared distance to the closest centroid (msd)
    and the mean silhouette coefficient, per k the sweep trained; the recommended k is a dashed
    line on both, the msd curve's elbow and the best silhouette are circled. 409 while the sweep is
    not `Completed`. A Completed sweep's results never change: `ETag`, `Cache-Control` and 304 as
    for a model's plots."""
    _, fmt = choose_format(kind.value, request.headers.get("accept"))
    state = app_state(request)
    validators = if_none_match(request.headers)
    return await run_in_threadpool(_sweep_plot, state, name, fmt, validators)
