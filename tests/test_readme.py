"""The README's curl walk-throughs run, as written, against `centroid serve`."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import centroid_process, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH_HEADINGS = ("## Walk-through: the workshop's data preparation", "## Walk-through: train, deploy, predict")


def walkthrough_script() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = []
    for heading in WALKTHROUGH_HEADINGS:
        section = text[text.index(heading) :]
        blocks.append(re.search(r"```bash\n(.*?)```", section, re.S).group(1))  # type: ignore[union-attr]
    return "\n".join(blocks)


def run_walkthrough(base_url: str, tmp_path: Path, curl_headers: str = "") -> subprocess.CompletedProcess[str]:
    """The walk-throughs as a bash script against ``base_url``; any failing curl stops it."""
    script = "\n".join(
        [
            "set -euo pipefail",
            f'curl() {{ command curl --fail-with-body --max-time 60 {curl_headers} "$@"; }}',
            walkthrough_script().replace("API=http://127.0.0.1:8000", f"API={base_url}"),
        ]
    )
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    (workdir / "service").symlink_to(ROOT / "service")
    return subprocess.run(["bash", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=300)


def server_ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    env = {"CENTROID_DATA_DIR": str(tmp_path / "data"), "CENTROID_WORKER_POLL_INTERVAL": "0.2"}
    server = centroid_process(["serve", "--port", base_url.rsplit(":", 1)[1]], env, tmp_path / "serve.log")
    try:
        wait_for(lambda: server_ready(base_url), lambda ok: ok, timeout=60, interval=0.2)
        result = run_walkthrough(base_url, tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"cluster_counts"' in result.stdout
    assert '"closest_cluster"' in result.stdout
