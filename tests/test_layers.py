"""The layers declared in pyproject.toml ([tool.importlinter]) hold: `lint-imports` checks every
import, direct or through others (function-level imports included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_every_layer_contract_is_kept() -> None:
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "6 kept" in result.stdout  # every declared contract was checked


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    """The check can fail: the engine does import numpy, so forbidding it must be reported."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["service"]\n'
        "include_external_packages = true\n\n"
        "[[tool.importlinter.contracts]]\n"
        'name = "the engine without numpy"\n'
        'type = "forbidden"\n'
        'source_modules = ["service.engine"]\n'
        'forbidden_modules = ["numpy"]\n'
    )
    result = _lint(str(config))
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "service.engine" in result.stdout
