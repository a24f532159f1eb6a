"""Throughput of the built-in GPT against Hugging Face models of the same size, on this machine.

Each model is 4 layers, 64 wide, 4 heads, T=64, on the built-in corpus with a BPE of 2048
tokens (the prepared data is shared). The built-in ``gpt`` and ``hf:gpt2`` are the same
architecture (learned positions, LayerNorm, GELU MLP 4x wide, tied embeddings);
``hf:llama`` has RMSNorm, rotary positions, a SwiGLU MLP of about the same parameter count
(172 wide) and an untied output head. Every trial is real (one process, fp32, the same
batch and steps), run ``--repeats`` times; the table gives the median tokens/s and its
spread, and first the one-time preparation of the data in an empty cache.

    python benchmarks/workloads.py                 # 3 repeats per model
    python benchmarks/workloads.py --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cotune import derive, runner, workload  # noqa: E402
from cotune.data import prepare_data  # noqa: E402
from cotune.space import SearchSpace  # noqa: E402

SHAPE = {"seq_len": 64, "data": "builtin:stdlib-docstrings", "tokenizer": "bpe:2048"}
MODELS = {
    "gpt": {"model": "gpt", "n_layer": 4, "n_embd": 64, "n_head": 4},
    "hf:gpt2": {"model": "hf:gpt2", "config": {"n_layer": 4, "n_embd": 64, "n_head": 4}},
    "hf:llama": {"model": "hf:llama", "config": {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                                                 "num_key_value_heads": 4, "intermediate_size": 172}},
}
KNOBS = {"micro_batch_size": 16, "global_batch_size": 32, "learning_rate": 1e-3}


def space_for(name: str, measured_steps: int) -> SearchSpace:
    return SearchSpace.model_validate({
        "name": f"bench-{name.replace(':', '-')}", "workload": {**MODELS[name], **SHAPE},
        "trial": {"warmup_steps": 3, "measured_steps": measured_steps, "token_budget": 32 * 64 * 40,
                  "eval_tokens": 4096, "timeout_s": 300},
        "knobs": {},
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measured-steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        t = time.perf_counter()
        data = prepare_data(SHAPE["data"], cache, seq_len=SHAPE["seq_len"], tokenizer=SHAPE["tokenizer"])
        prep_s = time.perf_counter() - t
        print(f"data: {data.source}; first preparation {prep_s:.1f} s "
              f"({data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens)\n")
        for name in MODELS:
            space = space_for(name, args.measured_steps)
            info = workload.describe(space.workload, vocab_size=data.vocab_size, eot_id=data.eot_id,
                                     pad_id=data.pad_id, cache_dir=cache)
            config, reason = derive.build_config(space, KNOBS, world_size=1, vocab_size=data.vocab_size,
                                                 workload=info)
            assert not reason, reason
            speeds, steps = [], []
            for k in range(args.repeats):
                result = runner.launch_trial(config, Path(tmp) / f"{space.name}-{k}", cache_dir=cache)
                if result.status != "ok":
                    print(f"{name}: {result.status}: {result.reason}\n{result.error_tail}", file=sys.stderr)
                    return 1
                speeds.append(result.metrics["tokens_per_second"])
                steps.append(result.metrics["step_time_mean_s"])
            rows.append({"model": name, "n_params": result.metrics["n_params"],
                         "tokens_per_second": statistics.median(speeds),
                         "spread": (max(speeds) - min(speeds)) / 2 if len(speeds) > 1 else 0.0,
                         "step_ms": 1000 * statistics.median(steps), "repeats": args.repeats})
    print("| model | parameters | tokens/s (median) | ± half range | step time |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0]["tokens_per_second"]
    for r in rows:
        print(f"| {r['model']} | {r['n_params']:,} | {r['tokens_per_second']:,.0f} ({r['tokens_per_second'] / base:.2f}x) "
              f"| {r['spread']:,.0f} | {r['step_ms']:.1f} ms |")
    if args.json:
        args.json.write_text(json.dumps({"data_prep_s": prep_s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
