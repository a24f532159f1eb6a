"""``python -m cotune.trial CONFIG.json --result RESULT.json [--trace-dir DIR] [--cache-dir DIR]``.

Runs one trial in this process and writes its TrialResult atomically. Exit 0 when a
result was written (ok or a classified failure such as oom or diverged), 2 for a
user's error (message on stderr), anything else with a traceback for a crash.
torch is imported only after the arguments are read, inside the trial code, so the
trial's ``start_and_import`` phase counts it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cotune.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cotune.trial", description="Run one cotune trial.")
    parser.add_argument("config", type=Path, help="TrialConfig JSON file")
    parser.add_argument("--result", type=Path, required=True, help="where to write the TrialResult JSON")
    parser.add_argument("--trace-dir", type=Path, default=None, help="folder for the profiler's Chrome trace")
    parser.add_argument("--cache-dir", type=Path, default=None, help="prepared data and probes (default: ~/.cache/cotune)")
    parser.add_argument("--kernel-cache", type=Path, default=None, help="JSON file of Triton kernel timings to reuse")
    args = parser.parse_args(argv)

    from cotune.config import TrialConfig
    from cotune.data import default_cache_dir

    try:
        try:
            config = TrialConfig.load(args.config)
        except (OSError, ValueError) as e:  # unreadable file, bad JSON, unknown or missing keys
            raise UserError(f"{args.config}: not a valid trial config ({e})") from None
        from cotune.trial.train import run_trial  # imports torch

        result = run_trial(
            config, cache_dir=args.cache_dir or default_cache_dir(), trace_dir=args.trace_dir, own_process=True,
            kernel_cache=args.kernel_cache,
        )
    except UserError as e:
        print(f"cotune trial: error: {e}", file=sys.stderr)
        return 2
    # Under torchrun every rank runs this; rank 0 speaks for the trial. Another rank that
    # classified its own failure (out of memory) leaves its result beside rank 0's and exits
    # non-zero, so torchrun stops the ranks waiting on it instead of letting them hang.
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        result.save(args.result)
    elif result.status != "ok":
        result.save(args.result.with_name(f"{args.result.stem}.rank{rank}.json"))
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # The result is on disk (written atomically) and nothing else is left to do: skip the
    # interpreter's teardown of torch, which takes about a second per trial on a small CPU.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
