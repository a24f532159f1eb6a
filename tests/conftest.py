from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_SPACE = ROOT / "search_spaces" / "cpu-tiny-gpt.yaml"


@pytest.fixture(scope="session")
def fingerprint() -> dict:
    """This machine's real fingerprint (taken once: the probe starts a child process)."""
    from cotune.hardware import fingerprint as take

    return take()


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `cotune` command line in a child process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cotune.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )
