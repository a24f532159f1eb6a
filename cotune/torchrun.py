"""``python -m cotune.torchrun OPTIONS -m cotune.trial ARGS``: torchrun, and a result for each rank a signal ended.

torchrun's own argument parser and ``run``, with one addition: a rank that a signal ended never
wrote its result, so this writes one for it, as the runner says of a one-process trial so killed:
``oom`` for SIGKILL (the Linux out-of-memory killer's signal), ``crash`` for another (a segfault). Without it the trial would read as torchrun's exit
code, or as the crash of a rank that lost its peer. The fork server does the same for the torchrun it
runs with forked ranks (cotune.forkserver._torchrun).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path


def say_for_killed_ranks(exit_codes: dict[int, int], args: list[str]) -> None:
    """Write the result of each rank that a signal ended before it could write its own (``RESULT.rankN.json``,
    beside the ``--result`` in the trial's ``args``)."""
    from cotune.config import TrialResult

    if "--result" not in args[:-1]:
        return
    result = Path(args[args.index("--result") + 1])
    for rank, code in exit_codes.items():
        path = result.with_name(f"{result.stem}.rank{rank}.json")  # as cotune.trial.__main__ names it
        if code is None or code >= 0 or path.exists():
            continue
        if code == -signal.SIGKILL:
            said = TrialResult("oom", reason=f"rank {rank} was killed by SIGKILL without writing a result, most "
                                             "likely by the Linux out-of-memory killer")
        else:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            said = TrialResult("crash", reason=f"rank {rank} was killed by signal {name}")
        with contextlib.suppress(OSError):
            said.save(path)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = sys.argv[1:] if argv is None else argv
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        print(f"torchrun: a rank failed: {e}", file=sys.stderr)
        say_for_killed_ranks({rank: f.exitcode for rank, f in e.failures.items()}, argv)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
