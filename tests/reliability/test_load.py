"""A few seconds of the load test (benchmarks/load_test.py) against a real `centroid serve`.

CI checks what must hold under concurrency — no 5xx, no lost job, one model per completed job,
every upload intact — and never timings (the machine decides those). On PostgreSQL the separate
`centroid worker` is also SIGKILLed mid-training during the load and replaced at once: the job it
held must be retaken after its lease and complete exactly once. The full runs are
``python benchmarks/load_test.py --seconds 60`` (and ``--separate-worker --kill-worker-at 20`` on
PostgreSQL); their numbers are in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load_test import main, report, run


@pytest.mark.slow
def test_short_load_loses_nothing_and_never_answers_5xx(database_url: str, tmp_path: Path) -> None:
    # SQLite: the API and its embedded worker share the file (the one-command default);
    # PostgreSQL: `serve --no-worker` plus a separate `centroid worker` process, killed 1.5 s into
    # the load (a 3 s lease, so its job is retaken within the drain).
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
        kill_worker_at=1.5 if separate_worker else None,
        lease_seconds=3.0,
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
    if not separate_worker:
        assert result.kill is None
        return
    # the worker was killed while it trained, and its job was retaken and completed exactly once
    kill = result.kill
    assert kill is not None
    assert kill.problems == []
    assert kill.killed_pid and kill.replacement_pid and kill.killed_pid != kill.replacement_pid
    assert list(kill.held) == [kill.target_job]
    assert kill.held[kill.target_job]["attempts"] == 1
    assert kill.after_kill[kill.target_job]["status"] == "InProgress"
    final = kill.final[kill.target_job]
    assert final["status"] == "Completed" and final["attempts"] == 2 and final["model_id"]
    assert kill.models[kill.target_job] == 1
    assert result.ok


def test_kill_worker_at_needs_a_separate_worker(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--seconds", "3", "--kill-worker-at", "1"])
    assert exit_info.value.code == 2
    assert "--kill-worker-at needs --separate-worker" in capsys.readouterr().err
    with pytest.raises(ValueError, match="separate_worker"):
        run(seconds=3.0, kill_worker_at=1.0)
    with pytest.raises(ValueError, match="within the load phase"):
        run(seconds=3.0, separate_worker=True, kill_worker_at=5.0)
