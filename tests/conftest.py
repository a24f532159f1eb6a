from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton's kernels run in its interpreter on a machine without a GPU, and the mode is fixed
# when triton is first imported (its own library is decorated then). So it is chosen here,
# before any test imports triton; trials started by tests inherit it.
os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def real_search(tmp_path_factory) -> Path:
    """A folder holding a real 4-trial CPU study (with --profile and --report), made once per session (~40 s).

    Holds ``cotune.db`` (study ``cpu-tiny-gpt``), the report ``reports/cpu-tiny-gpt.html``
    that ``cotune search --report`` wrote, and the search's output in ``search.out``.
    Tests copy it before changing anything.
    """
    folder = tmp_path_factory.mktemp("real-search")
    result = run_cli("search", "--budget", "4", "--seed", "1", "--profile", "--report", cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    (folder / "search.out").write_text(result.stdout)
    return folder
