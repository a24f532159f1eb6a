"""A trial that misbehaves, once in a real `cotune search`: its status and reason are right, the search goes on
and launches exactly its budget, no other trial is lost, nothing is left running, and the next search
resumes to the exact budget.

Each case is one search of three trials on the misbehaving model (tests/faults/misbehave.py), whose first
trial of the right kind misbehaves as ``COTUNE_FAULT`` says; then the same command again finds the budget
spent (the failed trial counts) and launches nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from optuna.trial import TrialState

from cotune.config import TrialResult
from tests.faults.conftest import (
    assert_no_process_left,
    assert_ok,
    assert_study_exact,
    fired,
    load_trials,
    run_search,
    sqlite_url,
    write_space,
)
from tests.faults.misbehave import GLOO_ERROR, HALF_A_RESULT

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HANG_TIMEOUT_S = 10  # a two-process trial of this model takes under a second
OOM_KILLED = "rank 1 was killed by SIGKILL without writing a result, most likely by the Linux out-of-memory killer"


@dataclass(frozen=True)
class Fault:
    world_size: int  # 2: the fault is one rank's of a two-process trial (torchrun, forked from the fork server)
    status: str
    reason: str  # a regular expression the whole reason matches
    tail: str = ""  # text the recorded error tail holds
    flags: tuple[str, ...] = ()  # more `cotune search` flags
    fault: str = ""  # COTUNE_FAULT, if not the case's name


FAULTS = {
    "segfault": Fault(1, "crash", re.escape("killed by signal SIGSEGV"), tail="in segfault"),
    # One rank's segfault while its peer waits on it: the trial is that rank's, not its peer's lost connection.
    "segfault_on_one_rank": Fault(2, "crash", re.escape("rank 1 was killed by signal SIGSEGV"),
                                  fault="segfault_in_collective"),
    "hang": Fault(2, "timeout", re.escape(f"ran past its {HANG_TIMEOUT_S} s timeout")),
    "oom": Fault(2, "oom", re.escape("out of memory: RuntimeError on rank 1"), tail="can't allocate memory"),
    "oom_killed": Fault(2, "oom", re.escape(OOM_KILLED)),
    # The same with torchrun started fresh, not forked from the fork server.
    "oom_killed_fresh_start": Fault(2, "oom", re.escape(OOM_KILLED), flags=("--no-warm-start",), fault="oom_killed"),
    # Rank 1 killed while rank 0 waits for it in a collective: rank 0 fails too, on the lost connection, and the
    # trial is still rank 1's (torchrun names one dead rank; rank 0 waits to exit until it has seen rank 1's death).
    "oom_killed_in_collective": Fault(2, "oom", re.escape(OOM_KILLED)),
    "oom_killed_in_collective_fresh_start": Fault(2, "oom", re.escape(OOM_KILLED), flags=("--no-warm-start",),
                                                  fault="oom_killed_in_collective"),
    "nan": Fault(1, "diverged", r"training loss became nan at step \d+ of \d+ \(learning rate [0-9.e-]+\)"),
    "exit0": Fault(1, "crash", re.escape("exited without writing a result")),
    "error": Fault(1, "crash", re.escape(f"RuntimeError: {GLOO_ERROR}"), tail="in error"),
    "corrupt": Fault(1, "crash", re.escape("wrote a result that could not be read (JSONDecodeError: Unterminated "
                                           "string starting at: line 1 column 59 (char 58))")),
    "disk_full": Fault(1, "crash", r"could not write its result .*/trial-0000/result\.json: "
                                   r"OSError: \[Errno 27\] File too large", tail="could not write its result"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_misbehaving_trial_is_recorded_and_the_search_goes_on(name, folder):
    fault = FAULTS[name]
    space = write_space(folder, world_size=fault.world_size, timeout_s=HANG_TIMEOUT_S if name == "hang" else 60)
    out = run_search(folder, space, 3, *fault.flags, fault=fault.fault or name).stdout
    trials = load_trials(sqlite_url(folder))
    assert_study_exact(trials, 3)
    (bad,) = [t for t in trials if t.user_attrs["status"] != "ok"]
    assert bad.number == fired(folder)["trial"]
    assert (bad.user_attrs["status"], bad.state) == (fault.status, TrialState.FAIL), bad.user_attrs["reason"]
    assert re.fullmatch(fault.reason, bad.user_attrs["reason"]), bad.user_attrs["reason"]
    assert fault.tail in bad.user_attrs["error_tail"], bad.user_attrs["error_tail"]
    assert f"trial {bad.number:3d} {fault.status}" in out  # the search said so as it went on
    for t in trials:
        if t is not bad:
            assert_ok(t, folder)
    trial_dir = folder / "cotune-runs" / "faults" / f"trial-{bad.number:04d}"
    if name == "corrupt":
        assert (trial_dir / "result.json").read_text() == HALF_A_RESULT
    elif name == "nan":  # the trial saw its loss become NaN, stopped and said so itself
        assert TrialResult.load(trial_dir / "result.json").status == "diverged"
    else:
        assert not (trial_dir / "result.json").exists()
    assert not list(trial_dir.glob("*.tmp")), "a half-written file was left behind"
    assert_no_process_left(folder)

    # The next search resumes to the exact budget: the failed trial counts, so it launches nothing more.
    out = run_search(folder, space, 3, *fault.flags).stdout
    assert "already holds 3 launched trials, the budget of 3 is spent" in out, out[-2000:]
    assert [(t.number, t.user_attrs["status"]) for t in load_trials(sqlite_url(folder))] == \
        [(t.number, t.user_attrs["status"]) for t in trials]
    assert_no_process_left(folder)
