"""CI's rule: a skipped test is a failure.

Tests skip when a service they need is missing (PostgreSQL, curl, nginx, /proc). On a developer's
laptop that is a convenience; in CI, where ``.ci/run`` installs all of them, a skip would mean a test
silently stopped running. ``.ci/run`` sets ``CENTROID_FORBID_SKIPS=1``, and then any skip turns a
green run red, listing each skipped test and its reason.

The hooks are registered by tests/conftest.py (imported there); tests/test_ci_rules.py checks them
in a pytest subprocess.
"""

from __future__ import annotations

import os

import pytest

FORBID_SKIPS = "CENTROID_FORBID_SKIPS"


def _skips_forbidden() -> bool:
    return os.environ.get(FORBID_SKIPS, "") not in ("", "0")


def _skipped(session_or_config: pytest.Session | pytest.Config) -> list[pytest.TestReport]:
    config = session_or_config if isinstance(session_or_config, pytest.Config) else session_or_config.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skips_forbidden() and exitstatus == pytest.ExitCode.OK and _skipped(session):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = _skipped(config)
    if not (_skips_forbidden() and skipped):
        return
    terminalreporter.section("skipped tests fail this run", sep="=", red=True, bold=True)
    terminalreporter.line(f"{FORBID_SKIPS} is set (CI installs every service the tests need), so a skip is a failure:")
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        terminalreporter.line(f"  {report.nodeid}: {reason}")
