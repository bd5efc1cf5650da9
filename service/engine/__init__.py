"""Centroid's k-means engine: SageMaker-compatible web-scale k-means as a plain library.

No web, database or cloud imports: it takes arrays or batch sources and plain hyperparameters,
and reads/writes SageMaker's ``model.tar.gz`` format. See docs/engine.md.
"""

from service.engine.errors import EngineInputError, TrainingStopped
from service.engine.hyperparameters import (
    HyperparameterError,
    KMeansHyperparameters,
    ParameterProblem,
)
from service.engine.metrics import TrainingMetrics
from service.engine.mxnet_format import (
    ModelFormatError,
    ModelState,
    NDArrayHeader,
    NDArrayList,
    read_model_state,
    read_model_tar,
    read_ndarray_list,
    write_model_tar,
    write_ndarray_list,
)
from service.engine.predict import CenterIndex, Prediction, as_feature_matrix, predict
from service.engine.sources import ArrayBatchSource, BatchSource, ParquetBatchSource
from service.engine.sweep import KResult, Recommendation, SweepResult, evaluate_centers, recommend_k, sweep
from service.engine.webscale import WebScaleKMeans, evaluate, reduce_centers

ENGINE_VERSION = "1.0.0"

__all__ = [
    "ENGINE_VERSION",
    "ArrayBatchSource",
    "BatchSource",
    "CenterIndex",
    "EngineInputError",
    "HyperparameterError",
    "KMeansHyperparameters",
    "KResult",
    "ModelFormatError",
    "ModelState",
    "NDArrayHeader",
    "NDArrayList",
    "ParameterProblem",
    "ParquetBatchSource",
    "Prediction",
    "Recommendation",
    "SweepResult",
    "TrainingMetrics",
    "TrainingStopped",
    "WebScaleKMeans",
    "as_feature_matrix",
    "evaluate",
    "predict",
    "read_model_state",
    "read_model_tar",
    "read_ndarray_list",
    "recommend_k",
    "reduce_centers",
    "sweep",
    "evaluate_centers",
    "write_model_tar",
    "write_ndarray_list",
]
