"""What a Centroid process holds for its lifetime, put together without the web framework.

:class:`CoreState` is all a worker needs (the standalone ``centroid worker`` process loads no web
framework); the API's :class:`service.deps.AppState` adds what only serving HTTP needs. The
backend registry is assembled here too: the one place that knows which backends exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.backends.registry import BackendRegistry
from service.db.migrate import upgrade_to_head
from service.db.session import Database
from service.endpoints.cache import ModelCache, ServingCatalog
from service.metrics import Metrics
from service.settings import Settings
from service.storage import LocalArtifactStore


@dataclass
class CoreState:
    """The process-wide resources shared by the API and the workers."""

    settings: Settings
    database: Database
    store: LocalArtifactStore
    backends: BackendRegistry
    model_cache: ModelCache
    metrics: Metrics
    catalog: ServingCatalog


def build_backends(settings: Settings) -> BackendRegistry:
    """Every backend is listed; ``ensure_configured`` decides whether jobs and endpoints may use it."""
    from service.backends.local import LocalBackend
    from service.backends.sagemaker import SageMakerBackend  # boto3: loaded only where backends are built

    return BackendRegistry([LocalBackend(), SageMakerBackend(settings)])


def build_core(settings: Settings) -> CoreState:
    database = Database(settings.resolved_database_url)
    store = LocalArtifactStore(settings.resolved_artifact_dir)
    model_cache = ModelCache()
    return CoreState(
        settings=settings,
        database=database,
        store=store,
        backends=build_backends(settings),
        model_cache=model_cache,
        metrics=Metrics(database, worker_expiry_seconds=settings.resolved_worker_expiry_seconds),
        catalog=ServingCatalog(database, store, model_cache, settings.serving_refresh_seconds),
    )


def start_up(state: CoreState) -> None:
    """Prepare storage and schema, and remove what a crashed process may have left behind."""
    from service.datasets.service import sweep_orphan_files
    from service.models.service import sweep_orphan_artifacts

    state.settings.data_dir.mkdir(parents=True, exist_ok=True)
    state.store.ensure_root()
    upgrade_to_head(state.database.engine)
    with state.database.session() as session:
        grace = state.settings.orphan_grace_seconds
        sweep_orphan_files(session, state.store, grace)
        sweep_orphan_artifacts(session, state.store, grace)
