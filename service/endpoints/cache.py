"""What serving keeps in the API process: loaded models, and the endpoint → model map.

Models are immutable once registered, so :class:`ModelCache` (keyed by model id) never serves
stale centroids; switching an endpoint to another model is just a different key.

Endpoints change (a switch completes, a delete starts). :class:`ServingCatalog` holds a snapshot
of every endpoint able to serve, with its model already loaded, so a request on a hot path
resolves its endpoint with one dictionary read and no database round trip. The snapshot is
rebuilt whenever the database's serving generation (see :mod:`service.db.changes`) moves:

* in this process, immediately: the code that commits such a change calls :meth:`changed`;
* in other processes (more API replicas, separate workers), by polling the generation every
  ``refresh_seconds`` (default 0.25 s) in a background thread. A switch or delete is therefore
  honoured everywhere within ``refresh_seconds`` plus one rebuild (a few milliseconds per new
  model): the documented staleness bound is 1 second.

The rebuild loads new models *before* swapping the snapshot, so requests never wait for a load
and a switch never fails a request: until the swap, the old model answers.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from service.backends.base import EndpointSpec, ServedModel
from service.datasets.online import CompiledRecipe, compile_recipe
from service.db.changes import serving_generation
from service.db.session import Database
from service.db.tables import EndpointTable, ModelTable
from service.models.service import served_model
from service.statuses import EndpointStatus
from service.storage import LocalArtifactStore

log = logging.getLogger("centroid.serving")
SERVING = (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING)
STALENESS_BOUND_SECONDS = 1.0


@dataclass(frozen=True)
class CachedModel:
    """What serving needs from a model row: centroids for the backend, key and recipe for rows."""

    served: ServedModel
    key_column: str | None
    recipe: dict[str, Any] | None
    k: int

    @cached_property
    def compiled_recipe(self) -> CompiledRecipe | None:
        """The recipe as numpy steps per feature (None when the model has no recipe)."""
        if self.recipe is None:
            return None
        return compile_recipe(self.recipe, self.served.feature_names, self.key_column)


def load_cached_model(row: ModelTable, store: LocalArtifactStore) -> CachedModel:
    return CachedModel(served_model(row, store), row.key_column, row.recipe, row.k)


class ModelCache:
    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, load: Callable[[], CachedModel]) -> CachedModel:
        with self._lock:
            if model_id in self._entries:
                self._entries.move_to_end(model_id)
                return self._entries[model_id]
        model = load()
        with self._lock:
            self._entries[model_id] = model
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return model

    def discard(self, model_id: str) -> None:
        with self._lock:
            self._entries.pop(model_id, None)


@dataclass(frozen=True)
class ServingEntry:
    """An endpoint able to serve, with the model it serves right now."""

    name: str
    backend: str
    status: str
    model: CachedModel
    spec: EndpointSpec


def serving_entry(row: EndpointTable, model: CachedModel) -> ServingEntry:
    spec = EndpointSpec(row.name, model.served, dict(row.instance_config or {}), dict(row.remote or {}))
    return ServingEntry(row.name, row.backend, row.status, model, spec)


@dataclass
class _Snapshot:
    generation: int = -1
    entries: dict[str, ServingEntry] = field(default_factory=dict)


class ServingCatalog:
    """Endpoint name → :class:`ServingEntry`, rebuilt when the serving generation moves."""

    def __init__(
        self, database: Database, store: LocalArtifactStore, models: ModelCache, refresh_seconds: float = 0.25
    ) -> None:
        self.database = database
        self.store = store
        self.models = models
        self.refresh_seconds = refresh_seconds
        self._snapshot = _Snapshot()
        self._refresh_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        """The serving generation the snapshot (and every cache keyed on it) was built from."""
        return self._snapshot.generation

    def lookup(self, name: str) -> ServingEntry | None:
        """The endpoint as of the last refresh: no lock, no database."""
        return self._snapshot.entries.get(name)

    def model(self, model_id: str) -> CachedModel:
        """A model loaded for serving (from the cache, or from the database once)."""
        return self.models.get(model_id, lambda: self._load_model(model_id))

    def _load_model(self, model_id: str) -> CachedModel:
        with self.database.session() as session:
            row = session.get(ModelTable, model_id)
            if row is None:
                raise LookupError(model_id)
            return load_cached_model(row, self.store)

    # --- keeping the snapshot fresh -----------------------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the snapshot if the generation moved (or ``force``); True if it was rebuilt."""
        with self._refresh_lock:
            with self.database.session() as session:
                generation = serving_generation(session)
                if generation == self._snapshot.generation and not force:
                    return False
                rows = session.scalars(select(EndpointTable).where(EndpointTable.status.in_(SERVING))).all()
                entries: dict[str, ServingEntry] = {}
                for row in rows:
                    try:
                        model = self.models.get(row.model_id, partial(self._model_from, session, row.model_id))
                    except LookupError:
                        continue
                    entries[row.name] = serving_entry(row, model)
            self._snapshot = _Snapshot(generation, entries)
            return True

    def _model_from(self, session: Any, model_id: str) -> CachedModel:
        row = session.get(ModelTable, model_id)
        if row is None:
            raise LookupError(model_id)
        return load_cached_model(row, self.store)

    def changed(self) -> None:
        """This process committed a serving change: rebuild now (no-op unless the catalog runs)."""
        if self._thread is None:
            return
        try:
            self.refresh()
        except SQLAlchemyError:
            log.warning("could not refresh the serving catalog now; the background refresh will retry")

    def start(self) -> None:
        """Build the first snapshot and keep polling the generation in a daemon thread."""
        try:
            self.refresh(force=True)
        except SQLAlchemyError:
            log.warning("could not build the serving catalog at start-up; retrying in the background")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._poll, name="centroid-serving-catalog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _poll(self) -> None:
        while not self._stopping.wait(self.refresh_seconds):
            try:
                self.refresh()
            except SQLAlchemyError as exc:  # the database is away: keep serving the last snapshot
                log.warning("serving catalog refresh failed (will retry): %s", type(exc).__name__)
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("serving catalog refresh raised")
