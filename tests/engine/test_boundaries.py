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


def test_the_error_hierarchy_loads_no_framework() -> None:
    """Storage, transforms, parsers and workers raise service.errors' classes: importing them (in a
    fresh interpreter, so nothing else has loaded them yet) loads no web or database framework."""
    import subprocess
    import sys

    probe = (
        "import sys, service.errors; "
        "print(sorted(m for m in ('fastapi', 'starlette', 'sqlalchemy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
