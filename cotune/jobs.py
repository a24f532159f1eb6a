"""Several trials at once on one machine: ``cotune search --jobs N``.

The search splits the machine into N disjoint slots (:func:`slots`): on a GPU machine each
slot gets its own GPUs (``CUDA_VISIBLE_DEVICES``), and everywhere each gets its own CPU
cores (affinity, inherited by the trial's whole process tree; the trial's torch threads
follow it, see ``runner.trial_env``). It then starts one worker process per slot
(``python -m cotune.jobs``, handed its settings on stdin), each an ordinary worker on the
same study: the budget, claims and dead-worker rules of cotune.workers hold between them
exactly as between workers on different machines. The search shows their trials as they
end, prefixed with the job, and one progress bar read from the study.

A worker dies with its search (the kernel's parent-death signal); a SIGTERM or Ctrl-C of
the search is passed on once, and each worker records its running trial as interrupted.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cotune.errors import Terminated, UserError
from cotune.forkserver import die_with_parent

STOP_WAIT_S = 30.0  # after passing on a SIGTERM or Ctrl-C: how long the workers get to record their trials


@dataclass(frozen=True)
class Slot:
    """The devices of one job: CPU cores, and on a GPU machine the GPUs (as ``CUDA_VISIBLE_DEVICES`` names them)."""

    index: int
    of: int
    cpus: tuple[int, ...]
    gpus: tuple[str, ...] = ()

    def describe(self) -> str:
        cores = f"core{'s' if len(self.cpus) > 1 else ''} {_ranges(self.cpus)}"
        return f"job {self.index + 1}/{self.of}: " + (f"GPU {','.join(self.gpus)}, " if self.gpus else "") + cores

    def to_dict(self) -> dict:
        return {"index": self.index, "of": self.of, "cpus": list(self.cpus), "gpus": list(self.gpus)}

    def enter(self) -> None:
        """Make this process (and every process it starts from now on) use only the slot's devices."""
        os.sched_setaffinity(0, self.cpus)
        if self.gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)


def slots(jobs: int, device: str, world_size: int, gpu_count: int) -> list[Slot]:
    """Split this machine into ``jobs`` disjoint slots for trials of up to ``world_size`` processes on ``device``;
    a split that leaves a job without the devices its trials need is the user's error (the --jobs flag)."""
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        raise UserError(f"--jobs {jobs}: this machine gives cotune {len(cpus)} CPU core(s), and each job needs one "
                        f"of its own; use --jobs {len(cpus)} or fewer")
    gpus: list[str] = []
    if device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(gpu_count)]
        if jobs * world_size > len(gpus):
            raise UserError(f"--jobs {jobs}: each trial of this space takes up to {world_size} GPU(s), so {jobs} jobs "
                            f"need {jobs * world_size}, but this machine has {len(gpus)}; use --jobs "
                            f"{max(1, len(gpus) // world_size)}, or a space with a smaller hardware.nproc")
    per_cpu, per_gpu = len(cpus) // jobs, world_size
    return [Slot(k, jobs, tuple(cpus[k * per_cpu:(k + 1) * per_cpu]),
                 tuple(gpus[k * per_gpu:(k + 1) * per_gpu]) if gpus else ()) for k in range(jobs)]


def _ranges(ids: tuple[int, ...]) -> str:
    """0,1,2,5 -> '0-2,5'."""
    out: list[str] = []
    for i in ids:
        if out and out[-1].endswith(f"-{i - 1}"):
            out[-1] = f"{out[-1].rsplit('-', 1)[0]}-{i}"
        elif out and out[-1] == str(i - 1):
            out[-1] = f"{i - 1}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


# --------------------------------------------------------------------------- the search's side


@dataclass
class WorkerRequest:
    """What one worker needs to join the study and run its trials, handed to it on stdin (pickled)."""

    settings: object  # cotune.search.SearchSettings, with ``job`` set to the slot
    storage_url: str
    study_name: str
    dead_after_s: int
    warm_start: bool
    cache_dir: Path
    slot: Slot


def start_workers(requests: list[WorkerRequest], on_line: Callable[[int, str], None]) -> list[subprocess.Popen]:
    """Start one worker per request; each line a worker prints goes to ``on_line(job index, line)``, from a
    thread of its own. Each worker has its own session (so a Ctrl-C reaches it once, from here) and dies
    with this process."""
    from cotune.runner import child_env

    procs = []
    for request in requests:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cotune.jobs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**child_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            preexec_fn=functools.partial(die_with_parent, os.getpid()))
        proc.stdin.write(pickle.dumps(request))
        proc.stdin.close()
        threading.Thread(target=_relay, args=(proc, request.slot.index, on_line), daemon=True,
                         name=f"cotune-job-{request.slot.index + 1}").start()
        procs.append(proc)
    return procs


def _relay(proc: subprocess.Popen, index: int, on_line: Callable[[int, str], None]) -> None:
    for raw in proc.stdout:
        on_line(index, raw.decode(errors="replace").rstrip("\n"))


def stop_workers(procs: list[subprocess.Popen], sig: int) -> None:
    """Pass ``sig`` on to the workers still running and wait for them to record their trials (then kill)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- the worker's side


def _terminate(signum, frame) -> None:
    raise Terminated()


def worker_main() -> int:
    """One job: join the study on the slot's devices and run trials until the budget is launched.

    Prints each trial's line as it ends; exits 0, 2 (a user error, in one ``error:`` line), 130 (Ctrl-C)
    or 143 (SIGTERM; the running trial is recorded as interrupted either way)."""
    request: WorkerRequest = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGTERM, _terminate)
    request.slot.enter()
    import optuna
    import sqlalchemy.exc

    from cotune import display, runner
    from cotune import search as engine
    from cotune.study import lost_database, open_storage

    settings = replace(request.settings, job=request.slot.to_dict())
    fork_server = runner.ForkServer(settings.runs_dir / f"fork-server-job{request.slot.index + 1}.log") \
        if request.warm_start else None
    current = {"number": -1}

    def on_start(number, config) -> None:
        current["number"] = number

    def on_done(progress, result) -> None:
        print(display.result_line(current["number"], result), flush=True)

    try:
        study = engine.load_study(open_storage(request.storage_url, dead_after_s=request.dead_after_s),
                                  request.study_name, settings)
        run_fn = runner.search_launcher(settings.runs_dir, cache_dir=request.cache_dir, trace=settings.profile,
                                        fork_server=fork_server)
        progress = engine.run_search(study, settings, run_fn, on_start=on_start, on_done=on_done)
    except UserError as e:
        print(f"error: {e}", flush=True)
        return 2
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        print(lost_database(request.storage_url, request.dead_after_s, e), flush=True)
        return 1
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 130
    finally:
        if fork_server is not None:
            fork_server.close()
    if progress.stopped:
        print(f"warning: {progress.stopped}", flush=True)
    return 0


def describe(slot_list: list[Slot]) -> str:
    return "; ".join(s.describe() for s in slot_list)


if __name__ == "__main__":
    sys.exit(worker_main())
