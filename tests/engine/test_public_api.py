"""The engine's public API (its layer rules are checked by tests/test_layers.py)."""

from __future__ import annotations

import service.engine as engine


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
