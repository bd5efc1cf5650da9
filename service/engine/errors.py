"""Exceptions shared by the engine modules."""

from __future__ import annotations


class EngineInputError(ValueError):
    """Input data the engine cannot use: wrong shape, non-numeric, non-finite or empty."""


class TrainingStopped(Exception):
    """Training was interrupted because the caller's ``should_stop()`` returned True."""

    def __init__(self, points_processed: int) -> None:
        self.points_processed = points_processed
        super().__init__(f"training stopped on request after {points_processed} points")
