"""cotune.trial.measure's host memory: the anonymous peak of a CPU process, not its mapped files.

Each case runs in a fresh Python process (as a trial does), so the figures are that process's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MIB = 2**20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="clear_refs is Linux's")
# Read one byte of every page of the file through a memory map, as batches read the corpus.
READ_EVERY_PAGE = "keep.append(np.memmap(path, dtype=np.uint8, mode='r')); int(keep[0][::4096].sum())"

# Prints the HostMemory figures, in MiB, after each step of a script; steps see `path` and `keep`.
CHILD = """
import json, sys
import numpy as np
from cotune.trial.measure import HostMemory, peak_memory
import torch
path, keep, out = sys.argv[1], [], []
host = HostMemory()
def record():
    out.append({"anonymous": host.anonymous_peak / 2**20, "rss": host.rss_peak / 2**20})
for step in json.loads(sys.argv[2]):
    exec(step)
    record()
metrics = peak_memory(torch.device("cpu"), host)
print(json.dumps({"resettable": host.resettable, "steps": out, "metrics": metrics}))
"""


def _child(path: Path, *steps: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(steps)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 96 MiB file, just written, so its pages are in the page cache."""
    path = tmp_path_factory.mktemp("corpus") / "tokens.bin"
    np.random.default_rng(0).integers(0, 2**16, size=48 * MIB, dtype=np.uint16).tofile(path)
    return path


def test_mapped_file_pages_raise_the_resident_peak_but_not_the_anonymous_one(corpus: Path) -> None:
    r = _child(
        corpus,
        "host.checkpoint()",
        READ_EVERY_PAGE + "; host.checkpoint()",
    )
    assert r["resettable"]
    before, after = r["steps"]
    assert after["rss"] - before["rss"] >= 90  # every page of the 96 MiB is now resident, file-backed
    # The anonymous peak moves only by what the read itself allocates (a 24K-element int view's sum).
    assert after["anonymous"] - before["anonymous"] < 4
    m = r["metrics"]
    assert m["peak_memory_bytes"] == pytest.approx(after["anonymous"] * MIB, abs=4 * MIB)
    assert m["peak_rss_bytes"] >= after["rss"] * MIB and m["peak_memory_source"].startswith("anonymous peak")


def test_an_anonymous_peak_freed_before_the_checkpoint_is_kept(corpus: Path) -> None:
    """The peak is the kernel's high-water mark, so a buffer freed before anyone looks still counts;
    file pages mapped after the checkpoint that follows it take nothing away."""
    r = _child(
        corpus,
        "host.checkpoint()",
        "b = np.ones(256 * 2**20, dtype=np.uint8); del b; host.checkpoint()",  # 256 MiB written, unmapped
        READ_EVERY_PAGE + "; host.checkpoint()",
    )
    start, freed, mapped = r["steps"]
    assert 250 <= freed["anonymous"] - start["anonymous"] <= 262  # the buffer, plus little else
    assert mapped["anonymous"] == freed["anonymous"]  # later file pages neither add to nor hide it
    assert mapped["rss"] == freed["rss"]  # 96 MiB of file pages stay below the resident set's 256 MiB peak
