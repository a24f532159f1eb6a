"""``python -m cotune.trial.describe``: what the search needs to know about a workload, before any trial.

Reads a request (JSON on stdin: model, config fields, seq_len, vocab_size, end-of-text and
pad token ids, and the space's n_layer/n_embd/n_head for a user's model), builds the
workload on the meta device (no memory, no initialisation: an 8B model costs nothing), and
prints one JSON line: the config fields cotune will pass, the objective, the shape, the
parameter count and why each layout knob cannot run ('' where it can). A user's mistake
is ``{"error": "..."}``. The search runs this in a child process so it never imports torch
or transformers itself (cotune.workload).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from cotune.errors import UserError


def describe(request: dict[str, Any]) -> dict[str, Any]:
    """The description of the workload ``request`` names (see the module docstring)."""
    import torch

    from cotune.config import WorkloadConfig
    from cotune.trial.workloads import build_workload, unsupported

    model, fields = request["model"], dict(request.get("config") or {})
    common = {"seq_len": request["seq_len"], "vocab_size": request["vocab_size"]}
    shape: dict[str, Any] = {k: request[k] for k in ("n_layer", "n_embd", "n_head") if request.get(k) is not None}
    if model.startswith("hf:"):
        from cotune.trial.hf import hf_config, model_source, resolve_config, shape_of

        fields, objective = resolve_config(model, fields, eot_id=request.get("eot_id"), pad_id=request.get("pad_id"),
                                           **common)
        built = hf_config(model_source(model), fields)
        shape, vocab = shape_of(built), built.vocab_size
        wl = WorkloadConfig(model=model, config=fields, objective=objective, **{**common, "vocab_size": vocab},
                            **shape)
    else:
        wl = WorkloadConfig(model=model, config=fields, **common, **shape)
    if model.startswith("hf:"):
        from cotune.trial.hf import build_hf

        with torch.device("meta"):  # shapes only: no memory, no initialisation, a checkpoint's weights unread
            workload = build_hf(wl, weights=False)
    else:
        try:
            with torch.device("meta"):
                workload = build_workload(wl)
        except UserError:
            raise
        except Exception:  # a user's model that cannot be built on the meta device is built for real
            workload = build_workload(wl)
    if not model.startswith("hf:"):
        shape = {**shape, "n_layer": len(workload.layer_list()) if workload.layers else shape.get("n_layer")}
    return {
        "config": fields,
        "objective": workload.objective,
        "vocab_size": wl.vocab_size,
        **{k: shape.get(k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden")},
        "n_params": workload.count_params(),
        "unsupported": unsupported(workload),
        "kernels": list(workload.kernels),
        "layers": workload.layers,
        "tp_plan": workload.tp_plan,
        "notes": {k: v for k, v in workload.extra.items() if isinstance(v, (str, int, float, bool))},
    }


def main() -> int:
    try:
        out = describe(json.loads(sys.stdin.read()))
    except UserError as e:
        out = {"error": str(e)}
    except Exception as e:
        lines = "".join(traceback.format_exception(e)).strip().splitlines()
        out = {"error": f"building the workload failed: {type(e).__name__}: {str(e).strip()[:300]}",
               "traceback": "\n".join(lines[-20:])}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    import os

    os._exit(code)  # skip torch's interpreter teardown
