"""The workshop's two tables, shipped with the package, and the notebook's preparation of them.

``crimes.csv`` (violent crime rates per US state) and ``densities.csv`` (population per square
mile) are the data of the SageMaker k-means workshop. :func:`workshop_frame` is the notebook's
preparation, done once here for everything that needs it outside the API (tests, benchmarks, the
sweep's example): ``DensityPerMile`` min-max scaled to [-1, 1] (``np.interp``), inner-joined to the
crimes on ``State``, the five features kept. Through the API the same result is a derived dataset
(README: "Walk-through").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SAMPLE_DATA = Path(__file__).resolve().parent
CRIMES_CSV = SAMPLE_DATA / "crimes.csv"
DENSITIES_CSV = SAMPLE_DATA / "densities.csv"
KEY_COLUMN = "State"
WORKSHOP_FEATURES = ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]


def workshop_frame() -> pd.DataFrame:
    """The 50 states x 5 features, indexed by ``State``, density scaled to [-1, 1]."""
    crimes = pd.read_csv(CRIMES_CSV)
    densities = pd.read_csv(DENSITIES_CSV)
    density = densities["DensityPerMile"].astype(float)
    densities["DensityPerMile"] = np.interp(density, (density.min(), density.max()), (-1, 1))
    joined = crimes.merge(densities, on=KEY_COLUMN, how="inner")
    return joined.set_index(KEY_COLUMN)[WORKSHOP_FEATURES]


def workshop_matrix(dtype: type[np.floating] = np.float32) -> np.ndarray:
    """:func:`workshop_frame` as a (50, 5) matrix, float32 like the notebook's."""
    return workshop_frame().to_numpy(dtype=dtype)
