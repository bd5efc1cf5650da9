"""The backends a process can use, by name (built where the app and the worker are assembled:
:func:`service.state.build_backends`)."""

from __future__ import annotations

from collections.abc import Iterator

from service.backends.base import Backend, BackendNotConfigured
from service.errors import InvalidInput, NotConfigured


class BackendRegistry:
    """The backends this process can use, by name."""

    def __init__(self, backends: list[Backend]) -> None:
        self._backends = {backend.name: backend for backend in backends}

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    def get(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            raise InvalidInput(f"backend {name!r} is not available in this deployment")
        return backend

    def usable(self, name: str) -> Backend:
        """The backend, or a 400 that says what configuration is missing."""
        backend = self.get(name)
        try:
            backend.ensure_configured()
        except BackendNotConfigured as exc:
            raise NotConfigured(f"backend {name!r} is not configured: {exc}", details={"backend": name}) from exc
        return backend
