"""Fixtures for the engine tests: the workshop matrix, the real SageMaker artifact, blobs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from service.sample_data import workshop_matrix as load_workshop_matrix

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "tests" / "data" / "kmeans-k10-d2-model.tar.gz"  # written by SageMaker's KMeans


@pytest.fixture(scope="session")
def workshop_matrix() -> np.ndarray:
    return load_workshop_matrix()


@pytest.fixture(scope="session")
def artifact_bytes() -> bytes:
    return ARTIFACT.read_bytes()


@pytest.fixture(scope="session")
def artifact_members(artifact_bytes: bytes) -> dict[str, bytes]:
    """The real artifact's members by name ('model_algo-1', 'state_<uuid>')."""
    with tarfile.open(fileobj=io.BytesIO(artifact_bytes)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def state_file(artifact_members: dict[str, bytes]) -> bytes:
    (name,) = [name for name in artifact_members if name.startswith("state_")]
    return artifact_members[name]


@pytest.fixture(scope="session")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Six tight, well-separated clusters in 4-D (12,000 rows) with their true labels."""
    X, y = make_blobs(n_samples=12_000, n_features=4, centers=6, cluster_std=0.4, random_state=3)
    return X, y
