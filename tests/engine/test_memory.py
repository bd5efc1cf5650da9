"""Streaming keeps memory bounded by the mini-batch, not by the data set."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS, COLUMNS = 2_500_000, 5  # 100 MB as float64 in memory

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, tracemalloc
    import numpy as np
    from service.engine import KMeansHyperparameters, ParquetBatchSource, WebScaleKMeans

    hp = KMeansHyperparameters(k=5, feature_dim=5, mini_batch_size=5000, seed=0)
    # Warm up on a small file: one-off costs (BLAS buffers, Arrow thread pools and allocator
    # arenas) are not what this test is about; growth with the data is.
    WebScaleKMeans.from_hyperparameters(hp).fit(ParquetBatchSource(sys.argv[2]))
    source = ParquetBatchSource(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    model = WebScaleKMeans.from_hyperparameters(hp).fit(source)
    _, traced_peak = tracemalloc.get_traced_memory()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_growth": after - before, "traced_peak": traced_peak,
                      "rows": sum(model.metrics_.cluster_sizes)}))
    """
)


def _write(path: Path, rows: int, rng: np.random.Generator) -> None:
    """Write ``rows`` x COLUMNS float64 in 50,000-row groups without holding it all in memory."""
    with pq.ParquetWriter(path, pa.schema([(f"c{i}", pa.float64()) for i in range(COLUMNS)])) as writer:
        for start in range(0, rows, 250_000):
            chunk = rng.normal(size=(min(250_000, rows - start), COLUMNS))
            writer.write_table(pa.table({f"c{i}": chunk[:, i] for i in range(COLUMNS)}), row_group_size=50_000)


def test_fitting_a_parquet_file_uses_a_fraction_of_its_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big, small = tmp_path / "big.parquet", tmp_path / "small.parquet"
    _write(big, ROWS, rng)
    _write(small, 100_000, rng)
    data_bytes = ROWS * COLUMNS * 8
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(small)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    measured = json.loads(result.stdout)
    assert measured["rows"] == ROWS
    # Peak growth of the whole process (numpy, Arrow buffers, everything) and of Python/numpy
    # allocations must both stay under a fifth of the data's in-memory size. Measured: about
    # 8 MB of RSS growth and 2 MB traced for 100 MB of data. (Before ParquetBatchSource turned
    # off pyarrow's pre_buffer, RSS grew by ~150 MB: more than the data.)
    assert measured["rss_growth"] * 5 <= data_bytes, measured
    assert measured["traced_peak"] * 5 <= data_bytes, measured
