"""A warm start for trials: a server that imported torch once forks each trial.

A fresh trial spends about a third of its wall time starting Python and importing torch.
The server (``python -m cotune.forkserver``, a child of the search in its own session)
imports torch and the trial-side modules once; for each trial it forks a child that
starts its own session, applies the trial's environment, sends stdout and stderr to the
trial's log and runs the same entry as ``python -m cotune.trial``. The runner treats that
child as it treats a fresh one (timeout, kill as a group, classification) through
:class:`ForkedTrial`, which looks like the ``subprocess.Popen`` it replaces.

A multi-process trial is ``torchrun OPTIONS -m cotune.trial ARGS``; forked, the child runs
torchrun itself: its own argument parser and launcher (the elastic agent, the c10d
rendezvous, the worker monitor) on the same OPTIONS, in-process, with the ranks forked
from the warm child (torchrun's ``--start-method fork`` for a function entry point)
instead of started as fresh interpreters. Each rank runs :func:`cotune.trial.__main__.main`
with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) as a
fresh rank would, and the trial's process tree is the child and its ranks, as it would be
torchrun's.

Fork is safe only before CUDA (or any accelerator runtime) is initialised: a forked child
inherits the parent's driver state but not its threads, and CUDA refuses to run in it. So
the server never touches a device; each trial initialises its own after the fork, and it
never opens the data. With a torch build that has no accelerator runtime (CPU), it also
imports the training module (``torch._dynamo`` and with it triton, half a second a trial
otherwise); with a CUDA or ROCm build it leaves that to the trial, as importing triton
looks for a driver. Triton reads ``TRITON_INTERPRET`` at its first import, so that
variable is part of the server's environment like any other: a trial that sets it
otherwise starts fresh (the runner sets it for every CPU trial, so CPU trials share one
server).

Protocol, one JSON object a line. Search to server (stdin): ``{"args", "env", "cwd",
"log", "torchrun"}`` (``torchrun``: torchrun's options, or null for one process). Server to search (stdout): ``{"ready": true}`` once the imports are done, then
``{"started": pid}`` for each request (or ``{"error": why}``) and ``{"exited": pid,
"returncode": rc}`` when that child ends (``rc`` < 0: killed by signal ``-rc``, as Popen's).

Nothing here imports torch at module level: the search side imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
READY_TIMEOUT_S = 120.0  # importing torch on a slow, busy disk; past this the trials start fresh
# What the server imports for every trial: torch and the trial side; and, where torch has no accelerator
# runtime, cotune.trial.train (PRELOAD_CPU), which imports torch._dynamo and with it triton.
PRELOAD_CPU = ("cotune.trial.train",)
PRELOAD = (
    "torch", "torch.distributed", "numpy", "cotune.config", "cotune.data", "cotune.hardware", "cotune.tiles",
    "cotune.trial.measure", "cotune.trial.distributed", "cotune.trial.batches", "cotune.trial.loss_scale",
    "cotune.trial.step", "cotune.trial.workloads", "cotune.trial.parallelize", "cotune.trial.__main__",
    "torch.distributed.run",
)
# Variables a trial may set differently from the server's environment: the child applies them itself.
PER_TRIAL_ENV = frozenset({"PYTHONUNBUFFERED", "PYTHONFAULTHANDLER", "OMP_NUM_THREADS"})


# --------------------------------------------------------------------------- search side


class ForkServer:
    """The search's handle on its fork server: started on the first trial, closed with the search.

    Not thread-safe: one thread launches trials through it. If the server cannot start or dies,
    :meth:`start_trial` returns None from then on and the runner starts trials fresh.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path  # the server's own stderr (None: discarded)
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] | None = None
        self._buffer = b""
        self._replies: list[dict] = []  # the server's replies to requests, in order
        self._exited: dict[int, int] = {}  # pid -> return code, as the server reports them
        self.failed: str | None = None  # why warm starts stopped, once they did
        self.lost: set[int] = set()  # trials killed because the server died while they ran

    def start_trial(self, args: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None,
                    torchrun: list[str] | None = None) -> ForkedTrial | None:
        """Fork ``python -m cotune.trial ARGS`` (under ``torchrun`` with these options, if given) with ``env``,
        output to ``log_path``; None: start it fresh."""
        if not self.start(env):
            return None
        if _differs(env, self._env):
            return None  # a variable read at import time differs from the server's: only a fresh start honours it
        request = {"args": [str(a) for a in args], "env": env, "cwd": str(cwd) if cwd else None, "log": str(log_path),
                   "torchrun": None if torchrun is None else [str(o) for o in torchrun]}
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            reply = self._next_reply(time.monotonic() + READY_TIMEOUT_S)
        except OSError as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        if reply is None or "started" not in reply:
            self._fail(f"it did not fork the trial ({(reply or {}).get('error', 'no reply')})")
            return None
        return ForkedTrial(reply["started"], self)

    def start(self, env: dict[str, str]) -> bool:
        """Start the server with ``env`` (the first trial's) unless it runs already; False if it cannot run."""
        if self._proc is None and self.failed is None:
            self._start(env)
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the server (its running children die with it)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # EOF: the server exits
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- used by ForkedTrial

    def wait_exit(self, pid: int, deadline: float | None) -> int | None:
        """``pid``'s return code once the server reports it, or None if ``deadline`` (monotonic) passes first.

        If the server is gone, its children died with it (SIGKILL at their parent's death): -SIGKILL,
        and ``pid`` is in :attr:`lost`.
        """
        while pid not in self._exited:
            if self._proc is None:
                self.lost.add(pid)
                return -signal.SIGKILL
            got = self._read(deadline)
            if got == "timeout":
                return None
            if got == "eof":
                self._fail("it exited")
        return self._exited.pop(pid)

    # ----- internals

    def _start(self, env: dict[str, str]) -> None:
        stderr = None
        try:
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                stderr = open(self.log_path, "ab")  # noqa: SIM115
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cotune.forkserver", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the search only
            )
        except OSError as e:
            self._fail(f"it could not start ({e})")
            return
        finally:
            if stderr is not None:
                stderr.close()
        self._env = dict(env)
        reply = self._next_reply(time.monotonic() + READY_TIMEOUT_S)
        if not (reply or {}).get("ready"):
            self._fail("it did not get ready" + (f"; see {self.log_path}" if self.log_path else ""))

    def _next_reply(self, deadline: float | None) -> dict | None:
        """The next reply that is not an exit report, or None at the deadline or the server's exit."""
        while not self._replies:
            if self._read(deadline) != "data":
                return None
        return self._replies.pop(0)

    def _read(self, deadline: float | None) -> str:
        """Read what the server wrote into the replies and exit reports: "data", "timeout" or "eof"."""
        out = self._proc.stdout
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([out], [], [], timeout)[0]:
            return "timeout"
        chunk = os.read(out.fileno(), 65536)
        if not chunk:
            return "eof"
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            reply = json.loads(line)
            if "exited" in reply:
                self._exited[reply["exited"]] = reply["returncode"]
            else:
                self._replies.append(reply)
        return "data"

    def _fail(self, why: str) -> None:
        self.failed = why
        print(f"cotune: the fork server stopped, so trials start fresh from now on: {why}", file=sys.stderr)
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None


def _differs(env: dict[str, str], server_env: dict[str, str] | None) -> bool:
    keys = (set(env) | set(server_env or {})) - PER_TRIAL_ENV
    return any(env.get(k) != (server_env or {}).get(k) for k in keys)


class ForkedTrial:
    """A trial the fork server started, with the part of ``subprocess.Popen``'s interface the runner uses."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server

    def poll(self) -> int | None:
        return self.wait(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            self.returncode = self._server.wait_exit(self.pid, deadline)
        if self.returncode is None:
            if timeout == 0:
                return None  # type: ignore[return-value]  # poll()
            raise subprocess.TimeoutExpired(f"trial {self.pid}", timeout)
        return self.returncode


# --------------------------------------------------------------------------- server side


def serve(parent_pid: int) -> None:
    """The server's loop: fork a trial per request, report each child's exit; exit at EOF or with the search."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the search decides when we stop (EOF or our death)
    replies = os.dup(1)
    os.dup2(2, 1)  # what an import prints goes to our log, not into the protocol
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        for name in PRELOAD_CPU:
            importlib.import_module(name)
    # After the imports: a variable the search did not set here may not be read by them either.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to wake_w
    _reply(replies, {"ready": True})
    server_pid = os.getpid()
    buffer = b""
    while True:
        ready = select.select([0, wake_r], [], [])[0]
        if wake_r in ready:
            os.read(wake_r, 4096)
            _report_exits(replies)
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the search closed us
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                try:
                    pid = os.fork()
                except OSError as e:
                    _reply(replies, {"error": f"fork failed: {e}"})
                    continue
                if pid == 0:
                    _run_child(request, server_pid=server_pid, close=(replies, wake_r, wake_w))
                _reply(replies, {"started": pid})
        _report_exits(replies)  # a SIGCHLD that came while we forked


def _report_exits(replies: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply(replies, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _reply(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _run_child(request: dict, *, server_pid: int, close: tuple[int, ...]) -> None:
    """In the forked child: become the trial's own process as a fresh start would be, run it, ``os._exit``."""
    code = 1
    try:
        os.setsid()  # own session and group (pgid == pid): the runner kills the trial as a group
        die_with_parent(server_pid)
        signal.set_wakeup_fd(-1)
        for fd in close:
            os.close(fd)
        for sig, handler in ((signal.SIGCHLD, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            signal.signal(sig, handler)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        if request["cwd"]:
            os.chdir(request["cwd"])
        _apply_env()
        import cotune.trial.__main__ as trial_main

        sys.argv = [trial_main.__file__, *request["args"]]  # as ``python -m cotune.trial ARGS`` sets it
        if request.get("torchrun") is None:
            code = trial_main.main(request["args"])
        else:
            code = _torchrun(request["torchrun"], request["args"])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _torchrun(options: list[str], args: list[str]) -> int:
    """``torchrun OPTIONS -m cotune.trial ARGS`` in this process, its ranks forked from it: 0, or 1 if a rank failed.

    The options go through torchrun's own parser and the same steps as ``torchrun``'s ``run``
    (``--standalone``: a c10d rendezvous on a free local port); only the entry point is a
    function and the start method ``fork``, so each rank starts with torch imported.
    """
    import uuid

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from cotune.torchrun import say_for_killed_ranks

    parsed = torchrun.get_args_parser().parse_args([*options, "-m", "cotune.trial", *args])
    if parsed.standalone:
        parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, _, _ = torchrun.config_from_args(parsed)
    config.start_method = "fork"
    global _AGENT_PID
    _AGENT_PID = os.getpid()
    try:
        elastic_launch(config, entrypoint=_rank)(args)
    except ChildFailedError as e:
        print(f"torchrun: a rank failed: {e}", file=sys.stderr)
        say_for_killed_ranks({rank: f.exitcode for rank, f in e.failures.items()}, args)
        return 1
    return 0


_AGENT_PID = 0  # in a forked torchrun trial: the process running torchrun, whose ranks die with it


def _rank(args: list[str]) -> None:
    """One rank of a forked torchrun trial: the trial's entry with the environment torchrun gave this rank.

    As a fresh rank would: the default handling of the signals torchrun's agent handles (a SIGTERM
    kills the rank), and torch's threads as torchrun set them; it also dies with the agent.
    """
    die_with_parent(_AGENT_PID)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _apply_env()  # OMP_NUM_THREADS as torchrun set it for the ranks
    import cotune.trial.__main__ as trial_main

    code = trial_main.main(args)
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    if code:
        sys.exit(code)


def _apply_env() -> None:
    """What a fresh interpreter and torch read from the environment at start, applied after the fork."""
    import faulthandler

    import torch

    if os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
    if os.environ.get("PYTHONFAULTHANDLER"):
        faulthandler.enable()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def alive(pid: int) -> bool:
    """Whether the process ``pid`` still runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); if the parent is gone already, exit now."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os._exit(1)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
