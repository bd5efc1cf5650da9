"""The engine is plain library code: no web, database, cloud or settings imports."""

from __future__ import annotations

import ast
from pathlib import Path

import service.engine as engine

ENGINE_DIR = Path(engine.__file__).resolve().parent
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "boto3", "botocore", "pydantic")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_imports_only_allowed_modules() -> None:
    for path in ENGINE_DIR.glob("*.py"):
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
            if name.startswith("service"):
                assert name.startswith("service.engine"), f"{path.name} imports {name}"


def test_public_api() -> None:
    expected = {
        "KMeansHyperparameters",
        "HyperparameterError",
        "ParameterProblem",
        "WebScaleKMeans",
        "TrainingMetrics",
        "TrainingStopped",
        "EngineInputError",
        "Prediction",
        "predict",
        "ArrayBatchSource",
        "ParquetBatchSource",
        "BatchSource",
        "read_ndarray_list",
        "write_ndarray_list",
        "NDArrayList",
        "read_model_tar",
        "write_model_tar",
        "ModelFormatError",
        "ENGINE_VERSION",
    }
    assert expected <= set(engine.__all__)
    assert all(hasattr(engine, name) for name in engine.__all__)
    assert isinstance(engine.ENGINE_VERSION, str) and engine.ENGINE_VERSION.count(".") == 2


def _loaded_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` importing ``module`` loads, in a fresh interpreter (nothing else has
    loaded them yet)."""
    import subprocess
    import sys

    probe = f"import sys, {module}; print(sorted(m for m in {candidates!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(loaded.strip())  # type: ignore[no-any-return]


def test_the_error_hierarchy_loads_no_framework() -> None:
    """Storage, transforms, parsers and workers raise service.errors' classes."""
    assert _loaded_by("service.errors", ("fastapi", "starlette", "sqlalchemy")) == []


def test_the_backend_interface_loads_no_backend() -> None:
    """The interface and the registry are imported by services and the app's state; the SageMaker
    backend (boto3) is loaded only where the backends are put together (service.main)."""
    for module in ("service.backends", "service.backends.base", "service.backends.registry"):
        assert _loaded_by(module, ("boto3", "botocore", "fastapi")) == [], module
