"""A user's model that misbehaves on purpose, once per search: the workload of the fault-injection tests.

A space names it as its own model (``workload.model: tests.faults.misbehave:build``, README "Your own
model"); the trial processes import it from the checkout, which cotune puts first on their path
(cotune.runner.child_env). It is cotune's built-in GPT with a forward hook that, at one forward pass of
one trial, does what the test named in ``COTUNE_FAULT`` (the search passes its environment on to its
trials):

- ``segfault``: a real segmentation fault (reads address 0 through ctypes);
- ``segfault_in_collective``: the same on rank 1 while rank 0 waits for it in the gradient all-reduce (rank 0
  then fails too, on the lost connection);
- ``hang``: rank 1 blocks in a receive from rank 0 that never comes, while rank 0 waits for it in the
  gradient all-reduce: the whole trial hangs inside torch.distributed until cotune's timeout;
- ``oom``: rank 1 asks the allocator for a petabyte (torch raises its CPU allocator's error);
- ``oom_killed``: rank 1 is killed by SIGKILL, as the Linux out-of-memory killer kills, while rank 0 computes;
- ``oom_killed_in_collective``: the same while rank 0 waits for rank 1 in the gradient all-reduce (rank 0
  then fails too, on the lost connection);
- ``nan``: the logits become NaN, so the loss does;
- ``exit0``: ``sys.exit(0)`` in the middle of training: exit code 0 and no result file;
- ``corrupt``: writes half a JSON object where the trial's result goes, then exits 0;
- ``error``: the model raises an exception whose text is gloo's on a lost peer (it looks like console markup);
- ``stall``: the trial sleeps, so a test can catch it running;
- ``gate``: every trial (not once) says it has arrived (``MARKER.arrived.PID``) and waits in the middle of
  training until the test creates ``MARKER.open``;
- ``disk_full``: when the trial opens its result file for writing, its file size limit (RLIMIT_FSIZE)
  drops to 1 KiB, as if the disk filled up: writing the result fails with EFBIG ("File too large").

Only one trial of a search fires: the first to remove the marker file ``COTUNE_FAULT_MARKER`` (removal
is atomic, so exactly one process wins), at its ``FIRE_AT``-th forward pass, on the rank the fault
names; with ``COTUNE_FAULT_TRIAL`` set, only trial number ``COTUNE_FAULT_TRIAL`` may. The process that
fired writes ``COTUNE_FAULT_MARKER + ".fired"`` (its pid and the trial's result path) before misbehaving,
so the test knows which trial it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cotune.config import WorkloadConfig
from cotune.trial.workloads import Workload, build_gpt

FAULT_ENV = "COTUNE_FAULT"
MARKER_ENV = "COTUNE_FAULT_MARKER"
TRIAL_ENV = "COTUNE_FAULT_TRIAL"
FAULTS = ("segfault", "segfault_in_collective", "hang", "oom", "oom_killed", "oom_killed_in_collective", "nan",
          "exit0", "corrupt", "disk_full", "error", "stall", "gate")
# Faults of one rank of a two-process trial.
ON_RANK_1 = ("segfault_in_collective", "hang", "oom", "oom_killed", "oom_killed_in_collective")
RANK_0_BUSY_S = 2.0  # twenty times torchrun's monitor interval: it sees rank 1's death before rank 0 notices
# What gloo says on the rank whose peer died, which looks like console markup (a closing tag).
GLOO_ERROR = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
              "[127.0.0.1]:10384")
GATE_S = 120.0  # how long a trial waits at the gate before it goes on anyway
FIRE_AT = 3  # the forward pass that fires: after the warm-up step, in the middle of training
HALF_A_RESULT = '{"status": "ok", "metrics": {"tokens_per_second": 1234.5, "val_lo'
# Bytes a file may hold once the "disk" is full: less than a trial's result (1.5 KB and more), more than a line
# saying why it could not be written.
FILE_LIMIT = 1024


def build(cfg: WorkloadConfig) -> Workload:
    """The built-in GPT (data parallel, FSDP and checkpointing per block), armed with the test's fault."""
    gpt = build_gpt(cfg)
    fault = os.environ.get(FAULT_ENV, "")
    if fault not in ("", *FAULTS):
        raise ValueError(f"{FAULT_ENV} must be one of {FAULTS}, but got {fault!r}")
    if fault:
        gpt.model.register_forward_hook(_Fault(fault))
    return Workload(model=gpt.model, layers=gpt.layers, n_params=gpt.n_params)


class _Fault:
    """The forward hook: counts this process's forward passes and fires once per search."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if output.device.type == "meta" or self.calls != FIRE_AT:
            return None
        if self.fault == "gate":
            _wait_at_the_gate()  # every trial, no marker
            return None
        rank = int(os.environ.get("RANK", "0"))
        if self.fault == "oom_killed" and rank == 0:
            time.sleep(RANK_0_BUSY_S)  # a slower rank: busy computing, not yet in a collective, when rank 1 dies
        if rank != (1 if self.fault in ON_RANK_1 else 0) or not _take_marker():
            return None
        return getattr(self, self.fault)(output)

    def segfault(self, output: torch.Tensor) -> None:
        ctypes.string_at(0)  # SIGSEGV: the process dies here (faulthandler prints where, to the log)

    def segfault_in_collective(self, output: torch.Tensor) -> None:
        time.sleep(0.5)  # rank 0 waits in the gradient all-reduce by now
        ctypes.string_at(0)

    def hang(self, output: torch.Tensor) -> None:
        # Rank 0 goes on to the backward pass and waits in the gradient all-reduce for this rank, which waits
        # for a message rank 0 never sends: both block inside gloo, neither exits, torchrun sees nothing wrong.
        dist.recv(torch.zeros(1), src=0)

    def oom(self, output: torch.Tensor) -> None:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the allocator refuses at once

    def oom_killed(self, output: torch.Tensor) -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0 is still computing (see __call__)
        time.sleep(60)

    def oom_killed_in_collective(self, output: torch.Tensor) -> None:
        time.sleep(0.5)  # rank 0 waits in the gradient all-reduce by now
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    def error(self, output: torch.Tensor) -> None:
        raise RuntimeError(GLOO_ERROR)

    def stall(self, output: torch.Tensor) -> None:
        time.sleep(600)  # a trial caught running: the test kills its search now

    def nan(self, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan")

    def exit0(self, output: torch.Tensor) -> None:
        sys.exit(0)

    def corrupt(self, output: torch.Tensor) -> None:
        Path(_result_path()).write_text(HALF_A_RESULT)
        sys.exit(0)

    def disk_full(self, output: torch.Tensor) -> None:
        result_tmp = _result_path() + ".tmp"  # TrialResult.save writes there, then renames

        def full_disk(event: str, args: tuple) -> None:
            if event == "open" and str(args[0]) == result_tmp and "w" in str(args[1] or ""):
                # From now on no file of this process may grow past FILE_LIMIT bytes (the log included).
                resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.RLIM_INFINITY))

        sys.addaudithook(full_disk)


def _take_marker() -> bool:
    """True in the one process that removes the marker file first; it records itself beside it."""
    marker = os.environ.get(MARKER_ENV)
    if not marker or os.environ.get(TRIAL_ENV, str(_trial_number())) != str(_trial_number()):
        return False
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return False
    with contextlib.suppress(OSError):
        Path(marker + ".fired.tmp").write_text(json.dumps({"pid": os.getpid(), "result": _result_path()}))
        os.replace(marker + ".fired.tmp", marker + ".fired")  # whole, for a test polling for it
    return True


def _wait_at_the_gate() -> None:
    """Say this process arrived, then wait until the test opens the gate (at most ``GATE_S``)."""
    marker = os.environ[MARKER_ENV]
    Path(f"{marker}.arrived.{os.getpid()}").touch()
    deadline = time.monotonic() + GATE_S
    while not os.path.exists(marker + ".open") and time.monotonic() < deadline:
        time.sleep(0.05)


def _trial_number() -> int:
    return int(Path(_result_path()).parent.name.removeprefix("trial-"))


def _result_path() -> str:
    """The ``--result`` path of this trial (``python -m cotune.trial CONFIG --result PATH``; forked trials and
    torchrun's ranks have the same arguments in ``sys.argv``)."""
    argv = sys.argv
    return argv[argv.index("--result") + 1]
