"""The ceiling for ``bench_serving.py``: a bare FastAPI app with Centroid's hot paths and no work behind them.

    python -m uvicorn benchmarks.bare_app:app --port 8001 --log-level warning --no-access-log

Only FastAPI's default middleware; no authentication, logging, metrics, database or model. Every
route reads the request (POST bodies included, as any server must) and answers a small constant
JSON body shaped like Centroid's answer, through FastAPI's ordinary response path. What Centroid
does on top of this is what ``bench_serving.py``'s ratio measures.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)

INVOCATION: dict[str, Any] = {"predictions": [{"closest_cluster": 5.0, "distance_to_cluster": 9.15}]}
PREDICTION: dict[str, Any] = {
    "endpoint": "crime",
    "model_id": "mdl-0",
    "predictions": [{"key": "Alabama", "closest_cluster": 5, "distance_to_cluster": 9.15, "distances": None}],
    "cluster_counts": {"5": 1},
}
ASSIGNMENTS: dict[str, Any] = {
    "model_id": "mdl-0",
    "dataset_id": "ds-0",
    "key_column": "State",
    "clusters": {"Alabama": 5},
    "distances": {"Alabama": 9.15},
    "counts": {"5": 1},
}
HEALTH: dict[str, Any] = {"status": "ok", "checks": {}}


@app.post("/endpoints/{name}/invocations")
async def invocations(name: str, request: Request) -> dict[str, Any]:
    await request.body()
    return INVOCATION


@app.post("/endpoints/{name}/predictions")
async def predictions(name: str, request: Request) -> dict[str, Any]:
    await request.body()
    return PREDICTION


@app.get("/models/{model_id}/assignments")
async def assignments(model_id: str) -> dict[str, Any]:
    return ASSIGNMENTS


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return HEALTH
