"""The FastAPI application: routers, the one error handler, start-up and shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import api_docs, health
from service.auth import Authenticator
from service.console import router as console_router
from service.datasets import router as datasets_router
from service.deps import AppState
from service.endpoints import router as endpoints_router
from service.endpoints.serving import ServingService
from service.fast_lane import FastLane
from service.http_cache import RenderedCache
from service.http_errors import install_error_handlers
from service.jobs import router as jobs_router
from service.logging_setup import configure_logging
from service.middleware import EdgeMiddleware
from service.models import router as models_router
from service.openapi import build_openapi
from service.operations import router as operations_router
from service.plots import router as plots_router
from service.settings import Settings, get_settings
from service.state import build_core, start_up
from service.sweeps import router as sweeps_router
from workers.worker import EmbeddedWorker

log = logging.getLogger("centroid")

DESCRIPTION = """
Centroid runs the Amazon SageMaker k-means workshop as a REST service: upload tables, scale and
join them, train k-means (SageMaker's web-scale algorithm, locally or on SageMaker), deploy the
model to an endpoint and ask which cluster each row belongs to.

Every error has the body `{"error": {"code", "message", "details", "request_id"}}`.
"""


def build_state(settings: Settings) -> AppState:
    core = build_core(settings)
    return AppState(
        **vars(core),
        serving=ServingService(core.catalog, core.backends, settings, core.metrics, core.database),
        rendered_reads=RenderedCache(),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    state = build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start_up(state)
        state.catalog.start()
        from service.process_role import ElectedWorker  # one embedded worker per data dir (serve --workers N)

        worker = ElectedWorker(settings.data_dir, EmbeddedWorker(state)) if settings.embedded_worker else None
        if worker is not None:
            worker.start()
        if not settings.api_keys:
            log.warning("no API keys configured (CENTROID_API_KEYS): the API is open to anyone who can reach it")
        log.info(
            "centroid ready",
            extra={
                "database": state.database.dialect,
                "artifacts": str(state.store.root),
                "embedded_worker": bool(worker),
            },
        )
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            state.catalog.stop()
            state.database.dispose()

    app = FastAPI(
        title="Centroid",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by service/api_docs.py, with Swagger UI and ReDoc from the package, not a CDN
        redoc_url=None,
    )
    app.state.centroid = state
    install_error_handlers(app)
    app.add_middleware(FastLane, state=state)
    app.add_middleware(
        EdgeMiddleware,
        metrics=state.metrics,
        authenticator=Authenticator(settings.api_keys),
        max_bytes=settings.max_upload_bytes,
        max_csv_bytes=settings.max_csv_upload_bytes,
    )
    # Routes are matched in order: the hot paths (health, invocations, predictions, assignments) first.
    app.include_router(health.router)
    app.include_router(endpoints_router.hot)
    app.include_router(models_router.hot)
    app.include_router(endpoints_router.router)
    app.include_router(models_router.router)
    app.include_router(datasets_router.router)
    app.include_router(datasets_router.tasks_router)
    app.include_router(jobs_router.router)
    app.include_router(sweeps_router.router)
    app.include_router(plots_router.router)
    app.include_router(api_docs.router)  # last: never in the hot paths' way
    app.include_router(console_router.router)
    app.include_router(operations_router.router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> FastAPI:
    """``service.main:app`` builds the app from the environment on first use."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
