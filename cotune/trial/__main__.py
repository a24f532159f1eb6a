"""``python -m cotune.trial CONFIG.json --result RESULT.json [--trace-dir DIR] [--cache-dir DIR] [--progress FILE]``.

Runs one trial in this process and writes its TrialResult atomically. Exit 0 when a
result was written (ok or a classified failure such as oom or diverged), 2 for a
user's error (message on stderr), 1 for a crash (the traceback on stderr); a failure
also leaves ``RESULT.rankN.json`` holding this rank's own error.
torch is imported only after the arguments are read, inside the trial code, so the
trial's ``start_and_import`` phase counts it. A warm start (cotune.forkserver) calls
:func:`main` in a child forked from a server that imported torch already; its
``start_and_import`` counts from the fork.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from cotune.errors import UserError
from cotune.forkserver import alive, die_with_parent

ERROR_TAIL_LINES = 30
LOST_PEER_GRACE_S = 1.0  # how long a rank whose peer died waits before it exits (see below)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cotune.trial", description="Run one cotune trial.")
    parser.add_argument("config", type=Path, help="TrialConfig JSON file")
    parser.add_argument("--result", type=Path, required=True, help="where to write the TrialResult JSON")
    parser.add_argument("--trace-dir", type=Path, default=None, help="folder for the profiler's Chrome trace")
    parser.add_argument("--cache-dir", type=Path, default=None, help="prepared data and probes (default: ~/.cache/cotune)")
    parser.add_argument("--kernel-cache", type=Path, default=None, help="JSON file of Triton kernel timings to reuse")
    parser.add_argument("--progress", type=Path, default=None,
                        help="JSON-lines file the trial appends a record to at each rung (see run.rung_fractions)")
    args = parser.parse_args(argv)
    # The trial dies with whatever started it (the search, the fork server, torchrun's agent), even by SIGKILL;
    # a rank whose torchrun died before this line has lost its search too (torchrun dies with the search).
    die_with_parent(os.getppid())
    search_pid = os.environ.get("COTUNE_SEARCH_PID", "")
    if search_pid.isdigit() and not alive(int(search_pid)):
        print("cotune trial: the search that started this trial is gone; exiting", file=sys.stderr)
        return 1

    from cotune.config import LOST_PEER, TrialConfig, TrialResult
    from cotune.data import default_cache_dir

    # Under torchrun every rank runs this; rank 0 speaks for the trial with result.json. A rank
    # that fails leaves its own result (result.rankN.json: its exception, classified or not) and
    # exits non-zero, so torchrun stops the ranks waiting on it instead of letting them hang; the
    # runner takes the first rank's failure as the trial's, not torchrun's summary of it.
    rank = int(os.environ.get("RANK", "0"))
    rank_path = args.result.with_name(f"{args.result.stem}.rank{rank}.json")
    try:
        try:
            config = TrialConfig.load(args.config)
        except (OSError, ValueError) as e:  # unreadable file, bad JSON, unknown or missing keys
            raise UserError(f"{args.config}: not a valid trial config ({e})") from None
        from cotune.trial.train import train_and_measure  # imports torch

        result = train_and_measure(
            config, cache_dir=args.cache_dir or default_cache_dir(), trace_dir=args.trace_dir, own_process=True,
            kernel_cache=args.kernel_cache, progress_path=args.progress,
        )
    except UserError as e:
        print(f"cotune trial: error: {e}", file=sys.stderr)
        TrialResult("crash", reason=str(e), error_tail=f"cotune trial: error: {e}").save(rank_path)
        return 2
    except Exception as e:
        traceback.print_exc()  # the log keeps the whole traceback
        lines = "".join(traceback.format_exception(e)).strip().splitlines()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        where = f" on rank {rank}" if "WORLD_SIZE" in os.environ else ""
        TrialResult("crash", reason=f"{type(e).__name__}{where}: {first}",
                    error_tail="\n".join(lines[-ERROR_TAIL_LINES:])).save(rank_path)
        if where and any(s in str(e) for s in LOST_PEER):
            # Another rank died first (SIGKILL by the out-of-memory killer, a segfault) and this one lost its
            # connection: exit after torchrun has seen that rank's death (it looks every 0.1 s and names only
            # the first rank it finds dead), so the trial is recorded as the dead rank's failure, not this.
            time.sleep(LOST_PEER_GRACE_S)
        return 1
    from cotune.trial.distributed import reports

    if reports():  # rank 0; across machines, each machine's first rank (rank 0's result was sent to it)
        return _save_result(result, args.result, rank_path)
    elif result.status != "ok":
        result.save(rank_path)
        return 1
    return 0


def _save_result(result, path: Path, rank_path: Path) -> int:
    """Write the trial's result: 0. When it cannot be written (a full disk, a file size limit), 1: the half-written
    file is removed (TrialResult.save writes ``PATH.tmp`` first), which frees room for this rank's much smaller
    result saying why, so the trial is a crash with that reason rather than a bare exit code."""
    from cotune.config import TrialResult

    try:
        result.save(path)
        return 0
    except OSError as e:
        path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
        why = f"could not write its result {path}: {type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        print(f"cotune trial: error: {why}", file=sys.stderr)
    try:
        TrialResult("crash", reason=why).save(rank_path)  # its error tail: the log's, which has the line above
    except OSError:
        rank_path.with_suffix(rank_path.suffix + ".tmp").unlink(missing_ok=True)
    return 1


if __name__ == "__main__":
    code = main()
    # The result is on disk (written atomically) and nothing else is left to do: skip the
    # interpreter's teardown of torch, which takes about a second per trial on a small CPU.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
