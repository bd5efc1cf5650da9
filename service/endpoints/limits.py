"""Response-size bounds of the prediction paths (pure functions: no framework, no database)."""

from __future__ import annotations

from service.errors import PayloadTooLarge


def check_distances_budget(rows: int, k: int, limit: int) -> None:
    """413 when ``include_distances`` would return more than ``limit`` distances (``rows`` x ``k``).

    Checked before any distance is computed: the answer is known from the row count and the model.
    """
    cells = rows * k
    if cells <= limit:
        return
    rows_allowed = limit // max(k, 1)
    advice = (
        f"send at most {rows_allowed} rows per request with include_distances, or leave it off"
        if rows_allowed
        else "this model has more clusters than that; leave include_distances off"
    )
    raise PayloadTooLarge(
        f"include_distances would return {rows} rows x {k} clusters = {cells} distances; at most {limit} are "
        f"returned per request (CENTROID_MAX_DISTANCE_CELLS): {advice}",
        details={"rows": rows, "k": k, "cells": cells, "limit": limit, "rows_allowed": rows_allowed},
    )
