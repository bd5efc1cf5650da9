"""Models loaded for serving, kept in the API process.

Models are immutable once registered, so a cache keyed by model id never serves stale centroids;
switching an endpoint to another model is just a different key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.backends.base import ServedModel


@dataclass(frozen=True)
class CachedModel:
    """What serving needs from a model row: centroids for the backend, key and recipe for rows."""

    served: ServedModel
    key_column: str | None
    recipe: dict[str, Any] | None
    k: int


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
