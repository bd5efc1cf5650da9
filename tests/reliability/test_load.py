"""A few seconds of the load test (benchmarks/load_test.py) against a real `centroid serve`.

CI checks what must hold under concurrency — no 5xx, no lost job, one model per completed job,
every upload intact — and never timings (the machine decides those). The full run is
``python benchmarks/load_test.py --seconds 60``; its numbers are in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load_test import report, run


@pytest.mark.slow
def test_short_load_loses_nothing_and_never_answers_5xx(database_url: str, tmp_path: Path) -> None:
    # SQLite: the API and its embedded worker share the file (the one-command default);
    # PostgreSQL: `serve --no-worker` plus a separate `centroid worker` process.
    separate_worker = not database_url.startswith("sqlite")
    result = run(
        seconds=3.0,
        concurrency=4,
        database_url=database_url,
        separate_worker=separate_worker,
        baseline_requests=20,
        baseline_seconds=1.0,
        drain_timeout=90.0,
        job_interval=0.3,
        upload_interval=0.3,
        work_dir=tmp_path,
    )
    print(report(result))
    assert result.server_5xx == 0, result.unexpected
    assert result.transport_errors == 0, result.unexpected
    assert result.unexpected == []
    assert result.log_findings == []
    # the mix really happened
    assert result.loaded["invoke-csv"]["n"] > 0 and result.loaded["invoke-json"]["n"] > 0
    assert result.jobs_accepted > 0 and result.datasets_uploaded > 0
    # nothing lost
    assert result.jobs_lost == []
    assert result.jobs_final == {"Completed": result.jobs_accepted}
    assert result.model_problems == []
    assert result.dataset_problems == []
