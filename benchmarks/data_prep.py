"""How long preparing data takes: the first preparation, and the cached one every trial pays.

Prepares the built-in corpus (``builtin:stdlib-docstrings``) and a JSON Lines copy of it with
the ``bytes`` tokenizer and with a BPE trained on the train split, into an empty temporary
cache, and prints per row: seconds for the first preparation (read, normalise, split, train,
tokenize, publish), for the second call in the same process (a cache hit), and for a cache
hit in a fresh process (Python start + ``import cotune.data`` + the hit: what each trial
process pays), plus token counts.

    python benchmarks/data_prep.py                       # bytes and bpe:4096
    python benchmarks/data_prep.py --bpe 300 --max-docs 50 --json rows.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cotune.data import prepare_data  # noqa: E402
from cotune.data.builtin import stdlib_documents  # noqa: E402

BUILTIN = "builtin:stdlib-docstrings"


def _fresh_process_hit(spec: str, cache: Path, tokenizer: str) -> float:
    """Wall seconds of a new Python process that imports cotune.data and hits the cache."""
    script = f"from pathlib import Path; from cotune.data import prepare_data; prepare_data({spec!r}, " \
             f"Path({str(cache)!r}), tokenizer={tokenizer!r})"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=int, default=4096, help="the BPE's vocabulary size (default 4096)")
    parser.add_argument("--max-docs", type=int, default=None, help="documents in the JSON Lines copy (default all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        copy = Path(tmp) / "stdlib-docstrings.jsonl"
        with copy.open("w") as f:
            for i, (doc, _) in enumerate(stdlib_documents(None)):
                if args.max_docs is not None and i >= args.max_docs:
                    break
                f.write(json.dumps({"text": doc}) + "\n")
        for spec, label in ((BUILTIN, "builtin"), (str(copy), "JSON Lines copy")):
            for tokenizer in ("bytes", f"bpe:{args.bpe}"):
                t = time.perf_counter()
                first = prepare_data(spec, cache, tokenizer=tokenizer)
                first_s = time.perf_counter() - t
                t = time.perf_counter()
                again = prepare_data(spec, cache, tokenizer=tokenizer)
                cached_s = time.perf_counter() - t
                assert again == first
                rows.append({
                    "data": label, "tokenizer": tokenizer, "first_s": first_s, "cached_s": cached_s,
                    "fresh_process_hit_s": _fresh_process_hit(spec, cache, tokenizer),
                    "vocab_size": first.vocab_size, "train_tokens": first.n_train_tokens,
                    "val_tokens": first.n_val_tokens, "source": first.source,
                })
                print(f"{label}, {tokenizer}: {first_s:.2f} s", flush=True)

    print(f"\nPython {sys.version.split()[0]}; seconds (first: empty cache; cached: same process; "
          "new process: interpreter start + import + cache hit)\n")
    print("| data | tokenizer | first (s) | cached (s) | new process (s) | vocab | train tokens | val tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['tokenizer']} | {r['first_s']:.2f} | {r['cached_s']:.4f} | "
              f"{r['fresh_process_hit_s']:.2f} | {r['vocab_size']:,} | {r['train_tokens']:,} | {r['val_tokens']:,} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
