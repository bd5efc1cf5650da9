"""CI's rules for the test run itself (tests/ci_rules.py), checked in a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """
import pytest

def test_runs():
    assert True

def test_needs_a_service():
    pytest.skip("needs a service that is not here")
"""


def _run(tmp_path: Path, forbid: str | None, body: str = SAMPLE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(body)
    env = {key: value for key, value in os.environ.items() if key != "CENTROID_FORBID_SKIPS"}
    if forbid is not None:
        env["CENTROID_FORBID_SKIPS"] = forbid
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_rules", "-p", "no:cacheprovider", "-p", "no:randomly"]
        + ["--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def test_a_skip_fails_the_run_when_ci_forbids_skips(tmp_path: Path) -> None:
    result = _run(tmp_path, "1")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "skipped tests fail this run" in result.stdout
    assert "test_needs_a_service: needs a service that is not here" in result.stdout


@pytest.mark.parametrize("forbid", [None, "0"])
def test_a_skip_is_only_reported_elsewhere(tmp_path: Path, forbid: str | None) -> None:
    result = _run(tmp_path, forbid)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "1 passed, 1 skipped" in result.stdout


def test_a_run_without_skips_passes_when_skips_are_forbidden(tmp_path: Path) -> None:
    result = _run(tmp_path, "1", "def test_runs():\n    assert True\n")
    assert result.returncode == pytest.ExitCode.OK, result.stdout


def test_a_failing_run_keeps_its_own_status(tmp_path: Path) -> None:
    result = _run(tmp_path, "1", SAMPLE + "\ndef test_fails():\n    assert False\n")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
