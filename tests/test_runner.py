"""The runner: real child process trees, how they end, and that nothing outlives a trial."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cotune import runner
from cotune.config import OptimizerConfig, RunConfig, TrialConfig, TrialResult
from cotune.runner import classify, launch_trial, run_process, tail, trial_argv

REPO_ROOT = Path(__file__).resolve().parent.parent

# The children import cotune (to write results), so they get this checkout on their path.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}

OK_METRICS = {"tokens_per_second": 1234.5, "val_loss": 2.5, "n_params": 1000}

# A process tree: the child starts a sleeping grandchild in its own group and one that
# calls setsid() to leave the group (and, with --ignore-term, ignores SIGTERM, so only
# SIGKILL ends it). It writes the pids to argv[1] once both are running, then sleeps.
TREE_SCRIPT = """
import json, os, subprocess, sys, time
pids_path = sys.argv[1]
escaped_path = pids_path + ".escaped"
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
escaped = subprocess.Popen([sys.executable, sys.argv[2], escaped_path, *sys.argv[3:]])
while not os.path.exists(escaped_path):
    time.sleep(0.01)
pids = {"child": os.getpid(), "sleeper": sleeper.pid, "escaped": escaped.pid,
        "escaped_sid": int(open(escaped_path).read())}
with open(pids_path + ".tmp", "w") as f:
    json.dump(pids, f)
os.replace(pids_path + ".tmp", pids_path)
print("tree is up", flush=True)
time.sleep(60)
"""

ESCAPEE_SCRIPT = """
import os, signal, sys, time
os.setsid()  # leave the trial's session and group: only a descendant scan finds us now
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getsid(0)))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def _script(tmp_path: Path, body: str, name: str = "child.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _run(tmp_path: Path, body: str, timeout_s: float = 20.0) -> TrialResult:
    script = _script(tmp_path, body)
    return run_process(
        [sys.executable, str(script), str(tmp_path / "result.json")],
        result_path=tmp_path / "result.json",
        log_path=tmp_path / "log.txt",
        timeout_s=timeout_s,
        env=CHILD_ENV,
    )


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (dead; reaping it is its parent's job, maybe init's)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _all_gone(pids: list[int], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(_gone(pid) for pid in pids)


def _cleanup(pids: list[int]) -> None:
    """Kill what a failed test may have left behind, so one failure does not leak processes."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _tree_pids(pids_path: Path) -> list[int]:
    pids = json.loads(pids_path.read_text())
    return [pids["child"], pids["sleeper"], pids["escaped"]]


# --------------------------------------------------------------------------- real processes


@pytest.mark.multiprocess
def test_uncaught_exception_is_a_crash_with_the_traceback(tmp_path: Path) -> None:
    result = _run(tmp_path, 'print("starting")\nraise RuntimeError("boom: the model exploded")\n')
    assert result.status == "crash"
    assert result.reason == "exited with code 1"
    assert "Traceback" in result.error_tail
    assert "RuntimeError: boom: the model exploded" in result.error_tail
    assert result.phase_seconds["process_wall"] > 0


@pytest.mark.multiprocess
def test_os_exit_is_a_crash_naming_the_code(tmp_path: Path) -> None:
    result = _run(tmp_path, "import os\nos._exit(3)\n")
    assert result.status == "crash"
    assert "code 3" in result.reason
    result = _run(tmp_path, "import os\nos._exit(1)\n")
    assert result.reason == "exited with code 1"


@pytest.mark.multiprocess
def test_exit_zero_without_a_result_is_a_crash(tmp_path: Path) -> None:
    # A result from an earlier run in the same place must not be taken for this run's.
    TrialResult(status="ok", metrics=OK_METRICS).save(tmp_path / "result.json")
    result = _run(tmp_path, "print('done, but forgot the result')\n")
    assert result.status == "crash"
    assert result.reason == "exited without writing a result"
    assert "forgot the result" in result.error_tail


@pytest.mark.multiprocess
def test_sigkill_on_its_own_is_oom(tmp_path: Path) -> None:
    result = _run(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.status == "oom"
    assert "out-of-memory" in result.reason


@pytest.mark.multiprocess
def test_other_signal_is_a_crash_naming_it(tmp_path: Path) -> None:
    result = _run(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    assert result.status == "crash"
    assert result.reason == "killed by signal SIGTERM"


@pytest.mark.multiprocess
def test_ok_result_is_returned_with_its_metrics(tmp_path: Path) -> None:
    body = f"""
    import sys
    from cotune.config import TrialResult
    TrialResult(status="ok", metrics={OK_METRICS!r}, loss_curve=[[1, 512, 5.1], [2, 1024, 4.2]],
                phase_seconds={{"warmup": 0.5}}).save(sys.argv[1])
    """
    result = _run(tmp_path, body)
    assert result.status == "ok", result.reason
    assert result.metrics == OK_METRICS
    assert result.loss_curve == [[1, 512, 5.1], [2, 1024, 4.2]]
    # The trial's own phases are kept, the runner's wall time added.
    assert result.phase_seconds["warmup"] == 0.5
    assert result.phase_seconds["process_wall"] > 0


@pytest.mark.multiprocess
def test_nan_val_loss_is_diverged(tmp_path: Path) -> None:
    body = f"""
    import sys
    from cotune.config import TrialResult
    metrics = {{**{OK_METRICS!r}, "val_loss": float("nan")}}
    TrialResult(status="ok", metrics=metrics).save(sys.argv[1])
    """
    result = _run(tmp_path, body)
    assert result.status == "diverged"
    assert "nan" in result.reason
    assert result.metrics["tokens_per_second"] == OK_METRICS["tokens_per_second"]


@pytest.mark.multiprocess
def test_unreadable_result_is_a_crash(tmp_path: Path) -> None:
    result = _run(tmp_path, "import sys\nopen(sys.argv[1], 'w').write('{not json')\n")
    assert result.status == "crash"
    assert "could not be read" in result.reason


@pytest.mark.slow
@pytest.mark.multiprocess
def test_timeout_kills_the_whole_tree_including_a_setsid_grandchild(tmp_path: Path) -> None:
    tree = _script(tmp_path, TREE_SCRIPT, "tree.py")
    escapee = _script(tmp_path, ESCAPEE_SCRIPT, "escapee.py")
    pids_path = tmp_path / "pids.json"
    started = time.monotonic()
    try:
        result = run_process(
            [sys.executable, str(tree), str(pids_path), str(escapee), "--ignore-term"],
            result_path=tmp_path / "result.json",
            log_path=tmp_path / "log.txt",
            timeout_s=3.0,
        )
        elapsed = time.monotonic() - started
        assert pids_path.exists(), "the tree did not come up before the timeout"
        pids = json.loads(pids_path.read_text())
        # The setup really did escape: the grandchild runs a session of its own.
        assert pids["escaped_sid"] == pids["escaped"] != pids["child"]
        assert result.status == "timeout"
        assert result.reason == "ran past its 3 s timeout"
        assert "tree is up" in result.error_tail
        # SIGTERM is ignored by the escapee, so SIGKILL after the grace period ended it.
        assert 3.0 <= elapsed < 3.0 + runner.KILL_GRACE_S + 5.0
        assert result.phase_seconds["process_wall"] >= 3.0
        assert _all_gone(_tree_pids(pids_path)), "a process of the tree outlived the trial"
    finally:
        if pids_path.exists():
            _cleanup(_tree_pids(pids_path))


@pytest.mark.multiprocess
def test_leftover_group_member_is_killed_after_a_normal_exit(tmp_path: Path) -> None:
    # The child exits at once, leaving a grandchild that init adopts: only the group finds it.
    body = """
    import subprocess, sys
    from cotune.config import TrialResult
    straggler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(sys.argv[1] + ".pid", "w").write(str(straggler.pid))
    TrialResult(status="ok", metrics={"val_loss": 1.0}).save(sys.argv[1])
    """
    result = _run(tmp_path, body)
    straggler = int((tmp_path / "result.json.pid").read_text())
    try:
        assert result.status == "ok"
        assert _all_gone([straggler])
    finally:
        _cleanup([straggler])


def test_an_escapee_whose_parent_died_mid_trial_is_killed_without_scanning_while_timed(tmp_path: Path) -> None:
    """The intermediate process exits at once, leaving a setsid grandchild outside the group; the trial
    goes on for two seconds. Nothing scans while it runs: the orphan comes back to the runner (a
    subreaper), and the scan at the end finds and kills it."""
    escapee = _script(tmp_path, ESCAPEE_SCRIPT, "escapee.py")
    body = f"""
    import os, subprocess, sys, time
    from cotune.config import TrialResult
    middle = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys; subprocess.Popen([sys.executable, {str(escapee)!r}, sys.argv[1]])", sys.argv[1] + ".sid"])
    middle.wait()  # the escapee's parent is gone
    while not os.path.exists(sys.argv[1] + ".sid"):
        time.sleep(0.01)
    time.sleep(2)
    TrialResult(status="ok", metrics={{"val_loss": 1.0}}).save(sys.argv[1])
    """
    result = _run(tmp_path, body)
    import psutil

    pid = int((tmp_path / "result.json.sid").read_text())  # a setsid process leads its session: sid == pid
    try:
        assert result.status == "ok"
        assert not psutil.pid_exists(pid), "the orphaned escapee outlived its trial (or was left a zombie)"
    finally:
        _cleanup([pid])


@pytest.mark.multiprocess
def test_ctrl_c_kills_the_tree_and_reraises(tmp_path: Path) -> None:
    tree = _script(tmp_path, TREE_SCRIPT, "tree.py")
    escapee = _script(tmp_path, ESCAPEE_SCRIPT, "escapee.py")
    pids_path = tmp_path / "pids.json"
    driver = _script(
        tmp_path,
        f"""
        import signal, sys
        from pathlib import Path
        from cotune.runner import run_process
        # A Ctrl-C raises KeyboardInterrupt even if whoever started us ignored SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tmp = Path({str(tmp_path)!r})
        try:
            run_process([sys.executable, {str(tree)!r}, {str(pids_path)!r}, {str(escapee)!r}],
                        result_path=tmp / "result.json", log_path=tmp / "log.txt", timeout_s=60)
        except KeyboardInterrupt:
            (tmp / "interrupted").write_text("re-raised")
            raise
        """,
        "driver.py",
    )
    # The driver is the "search process"; its own session keeps our signal from reaching pytest.
    proc = subprocess.Popen([sys.executable, str(driver)], env=CHILD_ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not pids_path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert pids_path.exists(), "the tree did not come up"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        assert (tmp_path / "interrupted").read_text() == "re-raised"
        assert proc.returncode != 0
        assert _all_gone(_tree_pids(pids_path)), "a process of the tree outlived Ctrl-C"
    finally:
        proc.kill()
        proc.wait()
        if pids_path.exists():
            _cleanup(_tree_pids(pids_path))


@pytest.mark.multiprocess
def test_kill_tree_on_a_live_tree(tmp_path: Path) -> None:
    tree = _script(tmp_path, TREE_SCRIPT, "tree.py")
    escapee = _script(tmp_path, ESCAPEE_SCRIPT, "escapee.py")
    pids_path = tmp_path / "pids.json"
    proc = subprocess.Popen(
        [sys.executable, str(tree), str(pids_path), str(escapee)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not pids_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_path.exists(), "the tree did not come up"
        runner.kill_tree(proc, grace_s=1.0)
        assert proc.returncode == -signal.SIGTERM  # the leader was reaped, ended by SIGTERM
        assert _all_gone(_tree_pids(pids_path))
    finally:
        proc.kill()
        proc.wait()
        if pids_path.exists():
            _cleanup(_tree_pids(pids_path))


@pytest.mark.multiprocess
def test_run_trial_writes_config_and_log_and_runs_the_trial_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cotune.trial is a separate module; a stand-in with the same CLI shows what launch_trial does.
    fake_trial = _script(
        tmp_path,
        """
        import sys
        from cotune.config import TrialConfig, TrialResult
        config = TrialConfig.load(sys.argv[1])
        print("training", config.batch.micro_batch_size)
        print(" ".join(sys.argv[2:]))
        if config.run.seed == 99:  # stands for a trial that hangs
            import time
            time.sleep(60)
        metrics = {"val_loss": 3.0, "lr": config.optimizer.learning_rate}
        TrialResult(status="ok", metrics=metrics).save(sys.argv[sys.argv.index("--result") + 1])
        """,
        "fake_trial.py",
    )

    def fake_argv(config_path: Path, result_path: Path, **kwargs: object) -> list[str]:
        return [sys.executable, str(fake_trial), *trial_argv(config_path, result_path, **kwargs)[3:]]

    monkeypatch.setattr(runner, "trial_argv", fake_argv)
    config = TrialConfig(optimizer=OptimizerConfig(learning_rate=3e-4), run=RunConfig(timeout_s=30.0))
    trial_dir = tmp_path / "trials" / "0007"
    result = launch_trial(config, trial_dir, trace=True, cache_dir=tmp_path / "cache")
    assert result.status == "ok", (result.reason, result.error_tail)
    assert result.metrics == {"val_loss": 3.0, "lr": 3e-4}
    assert TrialConfig.load(trial_dir / "config.json") == config
    log = (trial_dir / "log.txt").read_text()
    assert "training 8" in log
    assert f"--trace-dir {trial_dir} --cache-dir {tmp_path / 'cache'}" in log
    assert TrialResult.load(trial_dir / "result.json").metrics["val_loss"] == 3.0

    # The timeout comes from the config.
    hanging = TrialConfig(run=RunConfig(timeout_s=1.0, seed=99))
    result = launch_trial(hanging, trial_dir)
    assert (result.status, result.reason) == ("timeout", "ran past its 1 s timeout")
    assert not (trial_dir / "result.json").exists()  # the earlier trial's result is not kept as this one's


# --------------------------------------------------------------------------- pure parts


def test_trial_argv() -> None:
    argv = trial_argv(Path("t/config.json"), Path("t/result.json"))
    assert argv == [sys.executable, "-m", "cotune.trial", "t/config.json", "--result", "t/result.json"]
    argv = trial_argv(Path("c.json"), Path("r.json"), trace_dir=Path("t"), cache_dir=Path("cache"))
    assert argv[-4:] == ["--trace-dir", "t", "--cache-dir", "cache"]


def test_classify_timeout_wins_and_names_the_limit() -> None:
    written = TrialResult(status="ok", metrics=OK_METRICS)
    out = classify(-15, None, True, "last words", timeout_s=90)
    assert (out.status, out.reason, out.error_tail) == ("timeout", "ran past its 90 s timeout", "last words")
    out = classify(-9, written, True, "", timeout_s=1.5)
    assert out.status == "timeout"
    assert out.reason.startswith("ran past its 1.5 s timeout after writing its result")


def test_classify_trusts_a_written_status() -> None:
    ok = TrialResult(status="ok", metrics=OK_METRICS, reason="")
    assert classify(0, ok, False, "").status == "ok"
    # Written before a crash on the way out: the measurement stands.
    assert classify(1, ok, False, "").status == "ok"
    oom = TrialResult(status="oom", reason="CUDA out of memory", error_tail="torch.OutOfMemoryError")
    out = classify(1, oom, False, "log")
    assert (out.status, out.reason, out.error_tail) == ("oom", "CUDA out of memory", "torch.OutOfMemoryError")
    # A failure the trial recorded without a tail gets the log's.
    assert classify(1, TrialResult(status="crash"), False, "log tail").error_tail == "log tail"


@pytest.mark.parametrize(
    ("metrics", "loss_curve", "reason"),
    [
        ({"val_loss": float("nan")}, [], "validation loss is nan"),
        ({"val_loss": "nan"}, [], "validation loss is nan"),  # as TrialResult's JSON encodes it
        ({"val_loss": "inf"}, [], "validation loss is inf"),
        ({"val_loss": 2.0}, [[1, 64, 3.0], [2, 128, "-inf"]], "training loss became -inf at step 2"),
        ({"val_loss": 2.0}, [[1, 64, float("nan")]], "training loss became nan at step 1"),
    ],
)
def test_classify_non_finite_loss_is_diverged(metrics: dict, loss_curve: list, reason: str) -> None:
    written = TrialResult(status="ok", metrics=metrics, loss_curve=loss_curve)
    out = classify(0, written, False, "")
    assert (out.status, out.reason) == ("diverged", reason)
    assert written.status == "ok", "classify must not modify its input"


def test_classify_finite_losses_stay_ok() -> None:
    written = TrialResult(status="ok", metrics={"val_loss": 2.0}, loss_curve=[[1, 64, 3.0], [2, 128, 2.5]])
    assert classify(0, written, False, "").status == "ok"


def test_classify_without_a_result() -> None:
    out = classify(-9, None, False, "tail")
    assert out.status == "oom" and "SIGKILL" in out.reason and out.error_tail == "tail"
    assert classify(1, None, False, "").reason == "exited with code 1"
    assert classify(-11, None, False, "").reason == "killed by signal SIGSEGV"
    assert classify(-11, None, False, "").status == "crash"
    out = classify(0, None, False, "tail")
    assert (out.status, out.reason, out.error_tail) == ("crash", "exited without writing a result", "tail")


def test_classify_unreadable_result_is_a_crash() -> None:
    out = classify(0, None, False, "tail", result_error="JSONDecodeError: Expecting value")
    assert out.status == "crash"
    assert "could not be read" in out.reason and "JSONDecodeError" in out.reason


def test_tail_reads_only_the_end(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {i}\n" for i in range(200_000)))  # about 2 MB
    assert tail(log, 3) == "line 199997\nline 199998\nline 199999"
    assert tail(log).splitlines() == [f"line {i}" for i in range(199_980, 200_000)]
    # Bounded: from a window smaller than the lines asked for, only what fits comes back.
    assert len(tail(log, 1000, max_bytes=1200)) <= 1200
    assert tail(tmp_path / "missing.txt") == ""
    assert tail(log, 0) == ""


def test_runner_does_not_import_torch() -> None:
    code = "import sys, cotune.runner; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=CHILD_ENV).returncode == 0


def test_nan_in_saved_result_round_trips_as_non_finite(tmp_path: Path) -> None:
    # The encoding classify relies on: NaN is saved as "nan" and float() reads it back.
    TrialResult(status="ok", metrics={"val_loss": float("nan")}).save(tmp_path / "r.json")
    assert math.isnan(float(TrialResult.load(tmp_path / "r.json").metrics["val_loss"]))


def test_the_rank_that_died_speaks_for_the_trial_not_the_peer_that_lost_it(tmp_path):
    from cotune.torchrun import say_for_killed_ranks

    result = tmp_path / "result.json"
    args = ["config.json", "--result", str(result)]
    # Rank 0 lost its peer and wrote its crash first; torchrun then names rank 1, ended by a signal.
    lost = TrialResult("crash", reason="RuntimeError on rank 0: [/gloo/pair.cc:553] Connection closed by peer [::1]:1")
    lost.save(tmp_path / "result.rank0.json")
    os.utime(tmp_path / "result.rank0.json", ns=(1, 1))  # written well before
    say_for_killed_ranks({0: 1, 1: -signal.SIGSEGV}, args)
    assert TrialResult.load(tmp_path / "result.rank1.json").reason == "rank 1 was killed by signal SIGSEGV"
    picked, _ = runner._first_failure(runner._rank_results(result))
    assert picked.reason == "rank 1 was killed by signal SIGSEGV"
    # SIGKILL is the out-of-memory killer's: oom, which goes before any crash.
    (tmp_path / "result.rank1.json").unlink()
    say_for_killed_ranks({1: -signal.SIGKILL, 2: -signal.SIGTERM}, args)
    picked, _ = runner._first_failure(runner._rank_results(result))
    assert picked.status == "oom" and picked.reason.startswith("rank 1 was killed by SIGKILL")
    # A rank that wrote its own result keeps it; a rank that exited with a code gets none.
    say_for_killed_ranks({0: -signal.SIGKILL, 3: 1}, args)
    assert TrialResult.load(tmp_path / "result.rank0.json").reason == lost.reason
    assert not (tmp_path / "result.rank3.json").exists()
    # Without a lost peer, the first crash written is the cause.
    TrialResult("crash", reason="ValueError on rank 4: bad shape").save(tmp_path / "result.rank4.json")
    os.utime(tmp_path / "result.rank4.json", ns=(2, 2))
    (tmp_path / "result.rank1.json").unlink()
    picked, _ = runner._first_failure(runner._rank_results(result))
    assert picked.reason == "ValueError on rank 4: bad shape"
