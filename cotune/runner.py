"""Run one trial as its own process tree: launch, time out, kill as a group, classify.

The search process holds no accelerator state, so every trial runs in a child process
(``python -m cotune.trial``) started in a new session: its own process group and no
controlling terminal, so a Ctrl-C in the terminal reaches only the search process,
which then kills the whole tree. How the child ended (exit code, signal, timeout, the
JSON result it wrote) becomes a ``TrialResult``: a failure is data, never an exception.
A trial may instead be forked from the search's fork server (cotune.forkserver), a warm
start with torch imported already (a multi-process trial runs torchrun there, its ranks
forked too); it gets its own session all the same and is timed out, killed and classified
the same way.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from cotune.config import LOST_PEER, TrialConfig, TrialResult
from cotune.forkserver import ForkedTrial, ForkServer, die_with_parent
from cotune.nodes import Rendezvous

KILL_GRACE_S = 2.0  # SIGTERM -> SIGKILL: time for a clean exit, short enough not to stall the search
ERROR_TAIL_LINES = 20
_SCAN_S = 5.0  # without a subreaper: how often a running tree is re-scanned for descendants whose parent died
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_EXIT_WAIT_S = 10.0  # after SIGKILL: a process holding GB of (GPU) memory takes a moment to release it
_TAIL_MAX_BYTES = 256 * 1024


# --------------------------------------------------------------------------- trials


def trial_argv(
    config_path: Path,
    result_path: Path,
    *,
    trace_dir: Path | None = None,
    cache_dir: Path | None = None,
    world_size: int = 1,
    kernel_cache: Path | None = None,
    progress_path: Path | None = None,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The command that runs one trial: ``python -m cotune.trial CONFIG --result RESULT``.

    With ``world_size`` > 1 the same module runs under torchrun (cotune.torchrun), one process per rank,
    all in the trial's one process tree; with ``rendezvous``, this machine's share of a trial
    across machines (cotune.nodes).
    """
    launcher = [sys.executable]
    if rendezvous is not None:
        launcher += ["-m", "cotune.torchrun", *rendezvous.torchrun_options()]
    elif world_size > 1:
        launcher += ["-m", "cotune.torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={world_size}"]
    return [*launcher, "-m", "cotune.trial", *trial_args(config_path, result_path, trace_dir=trace_dir,
                                                         cache_dir=cache_dir, kernel_cache=kernel_cache,
                                                         progress_path=progress_path)]


def trial_args(
    config_path: Path,
    result_path: Path,
    *,
    trace_dir: Path | None = None,
    cache_dir: Path | None = None,
    kernel_cache: Path | None = None,
    progress_path: Path | None = None,
) -> list[str]:
    """The arguments of ``python -m cotune.trial``: ``CONFIG --result RESULT`` and the optional paths."""
    args = [str(config_path), "--result", str(result_path)]
    if trace_dir is not None:
        args += ["--trace-dir", str(trace_dir)]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    if kernel_cache is not None:
        args += ["--kernel-cache", str(kernel_cache)]
    if progress_path is not None:
        args += ["--progress", str(progress_path)]
    return args


def launch_trial(
    config: TrialConfig,
    trial_dir: Path,
    *,
    cache_dir: Path | None = None,
    trace: bool = False,
    kernel_cache: Path | None = None,
    fork_server: ForkServer | None = None,
    on_rung: RungFn | None = None,
    rendezvous: Rendezvous | None = None,
) -> TrialResult:
    """Run ``config`` in its own process tree under ``trial_dir`` and say how it went.

    A config whose ranks span machines (``config.run.nnodes`` > 1) runs this machine's share, meeting
    the others at ``rendezvous`` (cotune.nodes); it waits for them at most the rendezvous's join timeout,
    on top of the config's own.

    ``kernel_cache`` is the study's file of Triton kernel timings (see cotune.trial.kernels.timing).
    With ``fork_server`` the trial is forked from it (a warm start: torch is imported already)
    rather than started fresh; a multi-process trial runs torchrun there with its ranks forked.
    With ``on_rung`` (and ``config.run.rung_fractions``) the trial reports each rung in
    ``progress.jsonl`` and ``on_rung(record)`` hears it: a non-empty answer says why to stop the trial
    there, and it ends ``pruned`` with the rung's metrics.

    The folder ends up holding ``config.json`` (the same JSON reruns the trial by hand),
    ``log.txt`` (stdout and stderr) and, if the trial got that far, ``result.json``.
    """
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    config_path = trial_dir / "config.json"
    config_path.write_text(config.to_json())
    result_path = trial_dir / "result.json"
    progress_path = trial_dir / "progress.jsonl" if on_rung is not None and config.run.rung_fractions else None
    argv = trial_argv(config_path, result_path, trace_dir=trial_dir if trace else None, cache_dir=cache_dir,
                      world_size=config.parallel.world_size, kernel_cache=kernel_cache, progress_path=progress_path,
                      rendezvous=rendezvous)
    result = run_process(
        argv,
        result_path=result_path,
        log_path=trial_dir / "log.txt",
        timeout_s=config.run.timeout_s + (rendezvous.join_timeout_s if rendezvous is not None else 0),
        env=trial_env(config.run.device, config.parallel.world_size // config.run.nnodes),
        fork_server=fork_server,
        progress=RungReports(progress_path, on_rung) if progress_path is not None else None,
    )
    if rendezvous is not None and result.status == "crash" and "RendezvousTimeoutError" in result.error_tail:
        result.reason = (f"the trial's other {rendezvous.nnodes - 1} machine(s) did not join its rendezvous at "
                         f"{rendezvous.endpoint} within {rendezvous.join_timeout_s} s: run `cotune node --rank R "
                         "--study NAME` with this storage on each (R = 1 .. nnodes - 1)")
    return result


def search_launcher(runs_dir: Path, *, cache_dir: Path | None, trace: bool,
                    fork_server: ForkServer | None) -> Callable[..., TrialResult]:
    """A search's ``run_fn``: :func:`launch_trial` with the study's Triton kernel timings (shared by its trials,
    in its runs folder) and the search's fork server."""

    def run(config: TrialConfig, trial_dir: Path, on_rung: RungFn | None = None,
            rendezvous: Rendezvous | None = None) -> TrialResult:
        return launch_trial(config, trial_dir, cache_dir=cache_dir, trace=trace,
                            kernel_cache=runs_dir / "kernel-timings.json", fork_server=fork_server, on_rung=on_rung,
                            rendezvous=rendezvous)

    return run


def trial_env(device: str, world_size: int = 1) -> dict[str, str]:
    """A trial's environment on ``device``: :func:`child_env`; a CPU trial runs Triton kernels, if it has any,
    in Triton's interpreter (read when triton is first imported). Every CPU trial gets it, Triton kernels or
    not, so all of a CPU search's trials fork from one server that imported triton already.

    A search pinned to some of the machine's cores (``--jobs``, or ``taskset``) gives the trial's ranks
    torch threads to match: the cores shared among its ``world_size`` processes, at least one each."""
    env = child_env()
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cores = len(os.sched_getaffinity(0))
    if "OMP_NUM_THREADS" not in os.environ and cores < (os.cpu_count() or cores):
        env["OMP_NUM_THREADS"] = str(max(1, cores // world_size))
    env[SEARCH_PID_ENV] = str(os.getpid())  # a rank that starts after we died exits (cotune.trial.__main__)
    return env


SEARCH_PID_ENV = "COTUNE_SEARCH_PID"


def child_env() -> dict[str, str]:
    """Our environment for a child that runs cotune's trial side: this cotune first on the path, so
    it runs the same code as the search, and the Hugging Face hub offline (nothing is downloaded;
    a model or tokenizer is read from disk)."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    return env


# --------------------------------------------------------------------------- rungs

RungFn = Callable[[dict[str, Any]], str]  # a rung's record -> why to stop the trial there ('' to go on)
_PROGRESS_POLL_S = 0.1  # how often a trial's progress file is looked at (a stat; reads only when it grew)


@dataclasses.dataclass
class RungReports:
    """A trial's rung records as it appends them (JSON lines), each passed to ``on_rung`` once."""

    path: Path
    on_rung: RungFn
    offset: int = 0
    last: dict[str, Any] | None = None  # the last rung heard
    stop_reason: str = ""

    def poll(self, may_stop: bool = True) -> bool:
        """Hear the complete lines written since the last poll; True when ``on_rung`` says stop (and
        ``may_stop``: a trial that has exited keeps its own result)."""
        try:
            if self.path.stat().st_size <= self.offset:
                return False
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return False
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.splitlines():
            self.last = json.loads(line)
            reason = self.on_rung(self.last)
            if reason and may_stop:
                self.stop_reason = reason
                return True
        return False

    def pruned(self) -> TrialResult:
        """The stopped trial's result: what it reported at the rung it was stopped at."""
        r = self.last or {}
        return TrialResult("pruned", metrics=r.get("metrics", {}), loss_curve=r.get("loss_curve", []),
                           phase_seconds=dict(r.get("phase_seconds", {})), reason=self.stop_reason)


# --------------------------------------------------------------------------- processes


def run_process(
    argv: list[str],
    *,
    result_path: Path,
    log_path: Path,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    fork_server: ForkServer | None = None,
    progress: RungReports | None = None,
) -> TrialResult:
    """Run ``argv`` in a new session, stdout and stderr to ``log_path``, for at most ``timeout_s``.

    On timeout the whole tree is killed and the result is ``timeout``; on Ctrl-C (or any
    exception while waiting) the tree is killed and the exception re-raised. A result JSON
    the process wrote to ``result_path`` is read and checked. ``env`` is the child's whole
    environment (default: ours). ``phase_seconds["process_wall"]`` is launch to exit.
    With ``fork_server``, ``argv`` (``python -m cotune.trial ARGS``) is forked from that server
    instead, in a new session all the same; if the server is unavailable it starts as usual.
    With ``progress`` its file is looked at every 0.1 s while the process runs; when its
    ``on_rung`` says stop, the tree is killed and the result is ``pruned``.
    """
    result_path, log_path = Path(result_path), Path(log_path)
    # A result left by an earlier run in the same place must not pass for this run's.
    result_path.unlink(missing_ok=True)
    if progress is not None:
        progress.path.unlink(missing_ok=True)
    for stale in _rank_results(result_path):
        stale.unlink(missing_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")  # the log tail is current even when we kill it
    child_env.setdefault("PYTHONFAULTHANDLER", "1")  # a segfault still leaves a Python traceback

    # Linux: a descendant whose parent dies comes back to us, not to init, so the end-of-trial scan finds
    # it and nothing scans the process table while the trial is being timed.
    subreaper = _become_subreaper()
    if fork_server is not None:
        fork_server.start(child_env)  # once per search, before the trial's clock and the scan of our children
    ours_before = {c.pid for c in _children_of_self()}
    start = time.monotonic()
    proc = _fork(fork_server, argv, child_env, log_path, cwd) if fork_server is not None else None
    if proc is None:
        try:
            proc = _start_fresh(argv, child_env, log_path, cwd)
        except OSError as exc:
            return TrialResult(
                status="crash",
                reason=f"could not start {argv[0]!r}: {exc}",
                phase_seconds={"process_wall": 0.0},
            )

    seen: set[psutil.Process] = set()
    try:
        timed_out = _wait(proc, start + timeout_s, seen, scan_every_s=None if subreaper else _SCAN_S,
                          progress=progress)
    except BaseException:
        # Ctrl-C or a bug in here: the tree must not outlive us either way.
        _end_tree(proc, seen, ours_before, kill_grace_s)
        raise
    wall = time.monotonic() - start
    # Timed out, or it exited: anything it left running (a daemon grandchild, a compile worker) goes too. A
    # trial stopped at a rung has nothing left to give, so it gets no grace.
    stopped = progress is not None and bool(progress.stop_reason)
    _end_tree(proc, seen, ours_before, 0.0 if stopped else kill_grace_s)
    if progress is not None and progress.stop_reason:
        out = progress.pruned()
        out.phase_seconds["process_wall"] = wall
        return out

    result, result_error = _load_result(result_path)
    if result is None and result_error is None:
        # A rank that failed (crashed, or classified its own failure such as out of memory) wrote
        # result.rankN.json and exited, which ends the job. The first to fail is the cause; the
        # others failed waiting on it in a collective, so its error speaks for the trial.
        result, result_error = _first_failure(_rank_results(result_path))
    out = classify(
        proc.returncode,
        result,
        timed_out,
        tail(log_path),
        timeout_s=timeout_s,
        result_error=result_error,
    )
    if isinstance(proc, ForkedTrial) and proc.pid in fork_server.lost and out.status == "oom":
        # Its SIGKILL came from the server's death (the trial dies with its parent), not from the OOM killer.
        out = TrialResult(status="crash", reason="killed when the fork server it was forked from died",
                          error_tail=out.error_tail)
    out.phase_seconds["process_wall"] = wall
    return out


def _start_fresh(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,  # a trial never waits on the terminal
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # own session and group: pgid == proc.pid
            # Killed with us, even by SIGKILL (Linux; kept across exec): torchrun too, whose ranks die with it.
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )


def _fork(server: ForkServer, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None):
    """``argv`` (``python -m cotune.trial ARGS``, or ``python -m cotune.torchrun OPTIONS -m cotune.trial ARGS``)
    forked from ``server``, or None: start it fresh."""
    if argv[1:3] == ["-m", "cotune.trial"]:
        return server.start_trial(argv[3:], env=env, log_path=log_path, cwd=cwd)
    if argv[1:3] == ["-m", "cotune.torchrun"] and "-m" in argv[3:]:
        entry = argv.index("-m", 3)
        if argv[entry + 1:entry + 2] == ["cotune.trial"]:
            return server.start_trial(argv[entry + 2:], env=env, log_path=log_path, cwd=cwd, torchrun=argv[3:entry])
    return None


def _rank_results(result_path: Path) -> list[Path]:
    return sorted(result_path.parent.glob(f"{result_path.stem}.rank*{result_path.suffix}"))


def _first_failure(paths: list[Path]) -> tuple[TrialResult | None, str | None]:
    """The rank result that says why the trial failed: a classified failure (out of memory on one
    rank) before a crash, a crash before a lost peer (a rank whose peer died: the peer's result,
    written for it by cotune.torchrun if a signal killed it, says why), then the first written."""
    found = []
    for path in paths:
        result, error = _load_result(path)
        try:
            written = path.stat().st_mtime_ns
        except OSError:
            written = 2**63
        crashed = result is None or result.status == "crash"
        lost_peer = result is not None and crashed and any(s in result.reason for s in LOST_PEER)
        found.append(((crashed, lost_peer, written, path.name), result, error))
    if not found:
        return None, None
    _, result, error = min(found, key=lambda item: item[0])
    return result, error


def _wait(proc: subprocess.Popen, deadline: float, seen: set[psutil.Process], scan_every_s: float | None,
          progress: RungReports | None = None) -> bool:
    """Wait until ``proc`` exits, ``deadline`` (monotonic) passes or ``progress`` says stop; True if it timed out.

    As a subreaper (``scan_every_s`` None) this only waits. Otherwise it scans the tree every
    ``scan_every_s`` into ``seen``, so a grandchild whose parent died (and which is no longer
    reachable from ``proc``) can still be killed later.
    """
    last_scan = time.monotonic()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        slices = [remaining] + ([scan_every_s] if scan_every_s is not None else []) \
            + ([_PROGRESS_POLL_S] if progress is not None else [])
        with contextlib.suppress(subprocess.TimeoutExpired):  # a slice ran out: poll or scan, then wait again
            proc.wait(timeout=min(slices))
            if progress is not None:
                progress.poll(may_stop=False)  # rungs written just before it exited are still heard
            return False
        if progress is not None and progress.poll():
            return False
        if scan_every_s is not None and time.monotonic() - last_scan >= scan_every_s:
            last_scan = time.monotonic()
            alive = {p for p in seen if _alive(p)}
            seen.clear()
            seen.update(alive, _descendants([proc.pid, *(p.pid for p in alive)]))


def _become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux's PR_SET_CHILD_SUBREAPER); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children_of_self() -> list[psutil.Process]:
    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def _end_tree(proc: subprocess.Popen, seen: set[psutil.Process], ours_before: set[int], grace_s: float) -> None:
    """Kill the trial's tree, including descendants re-parented to us when their parent died, and reap those."""
    adopted = {c for c in _children_of_self() if c.pid != proc.pid and c.pid not in ours_before}
    _kill_tree_even_if_interrupted(proc, seen | adopted | _descendants(c.pid for c in adopted), grace_s)
    # Whatever came back to us meanwhile (torchrun's workers once its agent died) is ours to reap.
    for c in _children_of_self():
        if c.pid != proc.pid and c.pid not in ours_before:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(c.pid, os.WNOHANG)


def kill_tree(
    proc: subprocess.Popen,
    *,
    known: Iterable[psutil.Process] = (),
    grace_s: float = KILL_GRACE_S,
) -> None:
    """Kill ``proc`` (started with ``start_new_session=True``) and everything it started, then reap it.

    The tree is ``proc``'s process group, plus its descendants found through parent links
    (which include ones that called ``setsid`` to leave the group), plus ``known``
    processes seen earlier whose parent may have died since. All get SIGTERM; what is
    still alive after ``grace_s`` gets SIGKILL. Returns once they are gone (or zombies
    awaiting a parent that is not us), bounded by a few seconds.
    """
    pgid = proc.pid  # a new session's leader: its pid is the group id
    tree = _tree(proc, known)
    _signal_all(pgid, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(p) for p in tree):
            break
        time.sleep(0.05)
    # Whatever was started during the grace period is caught here, then nothing gets a choice.
    tree |= _tree(proc, tree)
    _signal_all(pgid, tree, signal.SIGKILL)
    # A process stuck in the kernel (uninterruptible I/O) outlasts this wait; Popen reaps it later.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_EXIT_WAIT_S)
    deadline = time.monotonic() + _EXIT_WAIT_S
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.02)


def _kill_tree_even_if_interrupted(
    proc: subprocess.Popen, known: Iterable[psutil.Process], grace_s: float
) -> None:
    known = set(known)
    try:
        kill_tree(proc, known=known, grace_s=grace_s)
    except KeyboardInterrupt:
        # A second Ctrl-C means "now": skip the grace period, but still leave nothing behind.
        kill_tree(proc, known=known, grace_s=0.0)
        raise


def _tree(proc: subprocess.Popen, known: Iterable[psutil.Process]) -> set[psutil.Process]:
    """Live processes of ``proc``'s tree: its group, its descendants and those of ``known``."""
    alive = {p for p in known if _alive(p)}
    # proc.pid identifies proc only until it is reaped; after that the number may be reused.
    roots = [p.pid for p in alive] + ([proc.pid] if proc.returncode is None else [])
    return alive | _descendants(roots) | _group_members(proc.pid)


def _descendants(root_pids: Iterable[int]) -> set[psutil.Process]:
    """All processes below ``root_pids`` by parent links, from one scan of the process table."""
    children_of: dict[int, list[psutil.Process]] = {}
    for p in psutil.process_iter(["ppid"]):
        children_of.setdefault(p.info["ppid"], []).append(p)
    found: set[psutil.Process] = set()
    stack = list(root_pids)
    while stack:
        for child in children_of.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child.pid)
    return found


def _group_members(pgid: int) -> set[psutil.Process]:
    """Processes in group ``pgid``, including ones reparented away from the tree (to init)."""
    members = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):  # a process that exited while we looked
            if os.getpgid(pid) == pgid:
                members.add(psutil.Process(pid))
    return {p for p in members if _alive(p)}


def _signal_all(pgid: int, tree: Iterable[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is empty already
        os.killpg(pgid, sig)
    for p in tree:
        with contextlib.suppress(psutil.Error):  # gone already
            p.send_signal(sig)  # psutil checks the pid was not reused since we saw it


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie: a zombie is dead, only not yet reaped by its parent."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- classification


def _load_result(path: Path) -> tuple[TrialResult | None, str | None]:
    """(result, None) if ``path`` holds a valid result, (None, why) if it is unreadable, else (None, None)."""
    if not path.exists():
        return None, None
    try:
        return TrialResult.load(path), None
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        return None, f"{type(exc).__name__}: {exc}"


def classify(
    returncode: int | None,
    result: TrialResult | None,
    timed_out: bool,
    log_tail: str,
    *,
    timeout_s: float | None = None,
    result_error: str | None = None,
) -> TrialResult:
    """Say how a trial process ended, from its exit code, the result it wrote and whether it timed out.

    ``result`` is what the process wrote (None if nothing); ``result_error`` says why a
    result file that exists could not be read. Pure: the inputs are not modified.
    """
    if timed_out:
        limit = f"its {timeout_s:g} s timeout" if timeout_s is not None else "its timeout"
        reason = f"ran past {limit}"
        if result is not None:
            reason += " after writing its result (it hung while exiting)"
        return TrialResult(status="timeout", reason=reason, error_tail=log_tail)
    if result_error is not None:
        return TrialResult(
            status="crash",
            reason=f"wrote a result that could not be read ({result_error})",
            error_tail=log_tail,
        )
    if result is not None:
        out = dataclasses.replace(result, phase_seconds=dict(result.phase_seconds))
        if out.status == "ok":
            why = _divergence(out)
            if why is not None:
                out.status, out.reason = "diverged", why
        elif not out.error_tail:
            out.error_tail = log_tail
        return out
    if returncode == -signal.SIGKILL:
        return TrialResult(
            status="oom",
            reason="killed by SIGKILL without writing a result, most likely by the Linux out-of-memory killer",
            error_tail=log_tail,
        )
    if returncode is None:
        return TrialResult(status="crash", reason="did not exit", error_tail=log_tail)
    if returncode != 0:
        return TrialResult(status="crash", reason=_describe_exit(returncode), error_tail=log_tail)
    return TrialResult(status="crash", reason="exited without writing a result", error_tail=log_tail)


def _divergence(result: TrialResult) -> str | None:
    """Why an ``ok`` result's losses say training diverged (a NaN or inf loss), or None."""
    for point in result.loss_curve:  # [step, tokens_seen, train_loss]
        if len(point) >= 3 and not _finite(point[2]):
            return f"training loss became {float(point[2])} at step {point[0]}"
    val_loss = result.metrics.get("val_loss")
    if val_loss is not None and not _finite(val_loss):
        return f"validation loss is {float(val_loss)}"
    return None


def _finite(value: Any) -> bool:
    """False for NaN/inf, also in TrialResult's string encoding ("nan", "inf", "-inf")."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number at all: a malformed result, not a diverged one


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exited with code {returncode}"


# --------------------------------------------------------------------------- logs


def tail(path: str | Path, lines: int = ERROR_TAIL_LINES, *, max_bytes: int = _TAIL_MAX_BYTES) -> str:
    """The last ``lines`` lines of a text file, reading at most ``max_bytes`` from its end; "" if missing."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])
