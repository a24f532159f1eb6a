"""Trials larger than a machine: ranks on several machines, met at torchrun's c10d rendezvous.

A space's ``hardware.nnodes`` lets a trial's world_size exceed one machine's ``hardware.nproc``:
such a trial runs nproc processes on each of world_size / nproc machines (``run.nnodes``). The
search's machine runs the first share, under a torchrun that hosts the rendezvous on a free port;
a node agent, ``cotune node --rank R`` on each other machine, runs the rest. The agent watches
the study for running trials that span more than R machines and starts the same torchrun there,
from the config and rendezvous the search recorded on the trial (user attr ``nodes``), before it
launched its own share. torchrun numbers the machines as they join; rank 0's result is sent to
every machine's first rank, so the search reads it where it reads any trial's.

A machine that does not join in time (``JOIN_TIMEOUT_S``) fails the trial as a crash naming the
rendezvous; a rank lost mid-trial fails its peers' collectives, so each machine's share ends.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ADDR_ENV = "COTUNE_NODE_ADDR"  # the address other machines reach the search's machine at (default: its hostname)
JOIN_TIMEOUT_S = 120  # how long a trial's torchrun waits for the other machines to join
POLL_S = 0.5  # how often a node agent looks for trials to join


@dataclass(frozen=True)
class Rendezvous:
    """Where a multi-machine trial's torchruns meet: the c10d store on the search's machine."""

    endpoint: str  # host:port
    id: str
    nnodes: int
    nproc_per_node: int
    join_timeout_s: int = JOIN_TIMEOUT_S

    def torchrun_options(self) -> list[str]:
        return [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.id}",
                f"--rdzv-conf=join_timeout={self.join_timeout_s}"]

    def to_dict(self) -> dict:
        return asdict(self)


def new_rendezvous(nnodes: int, nproc_per_node: int, join_timeout_s: int = JOIN_TIMEOUT_S) -> Rendezvous:
    """A rendezvous on this machine (``$COTUNE_NODE_ADDR``, or its hostname) at a port free now."""
    host = os.environ.get(ADDR_ENV) or socket.gethostname()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return Rendezvous(f"{host}:{port}", f"cotune-{uuid.uuid4().hex[:12]}", nnodes, nproc_per_node, join_timeout_s)


def announce(trial, config, rendezvous: Rendezvous, *, progress: bool) -> None:
    """Record on ``trial`` what node agents need to run their share: the config, the rendezvous, and whether
    the trial reports rungs (every machine's ranks must take the same collectives)."""
    trial.set_user_attr("nodes", {"rendezvous": rendezvous.to_dict(), "config": config.to_dict(),
                                  "progress": progress})


# --------------------------------------------------------------------------- the node agent


def serve(study, rank: int, runs_dir: Path, cache_dir: Path | None, say: Callable[[str], None]) -> None:
    """Join, as machine ``rank``, every running trial of ``study`` that spans more than ``rank`` machines, one at
    a time, until interrupted (Ctrl-C or SIGTERM: the running share is killed, as a search kills its trial)."""
    from optuna.trial import TrialState

    joined: set[int] = set()
    while True:
        waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number not in joined and (t.user_attrs.get("nodes") or {}).get("rendezvous", {}).get(
                       "nnodes", 1) > rank]
        for t in sorted(waiting, key=lambda t: t.number):
            joined.add(t.number)
            say(f"trial {t.number:>3} joining as machine {rank} of {t.user_attrs['nodes']['rendezvous']['nnodes']}")
            result = join(t.number, t.user_attrs["nodes"], rank, runs_dir, cache_dir)
            recorded = _recorded_status(study, t._trial_id)
            here = "" if result.status == "ok" else \
                f"; this machine's share ended as {result.status}: {(result.reason.splitlines() or [''])[0][:200]}"
            say(f"trial {t.number:>3} {recorded}{here}")
        time.sleep(POLL_S)


def _recorded_status(study, trial_id: int, wait_s: float = 10.0) -> str:
    """The trial's status as its search records it, once it has (the search's share ends first, or together)."""
    deadline = time.monotonic() + wait_s
    while True:
        status = study._storage.get_trial(trial_id).user_attrs.get("status")
        if status is not None or time.monotonic() > deadline:
            return status or "not recorded yet by its search"
        time.sleep(0.2)


def join(number: int, nodes: dict, rank: int, runs_dir: Path, cache_dir: Path | None):
    """Run this machine's share of trial ``number``; its TrialResult as this machine saw it (rank 0's result
    when all went well, or this machine's own failure)."""
    from cotune import runner
    from cotune.config import TrialConfig

    config = TrialConfig.from_dict(nodes["config"])
    rendezvous = Rendezvous(**nodes["rendezvous"])
    folder = Path(runs_dir) / f"trial-{number:04d}" / f"node-{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    config_path, result_path = folder / "config.json", folder / "result.json"
    config_path.write_text(config.to_json())
    argv = runner.trial_argv(config_path, result_path, cache_dir=cache_dir, rendezvous=rendezvous,
                             progress_path=folder / "progress.jsonl" if nodes.get("progress") else None)
    return runner.run_process(argv, result_path=result_path, log_path=folder / "log.txt",
                              timeout_s=config.run.timeout_s + rendezvous.join_timeout_s,
                              env=runner.trial_env(config.run.device, rendezvous.nproc_per_node))
