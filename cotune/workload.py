"""What the search knows about a study's workload before the first trial: its shape and what it can run.

For the built-in ``gpt`` that is known from the space alone. A Hugging Face model or a
user's own is built once, on the meta device, by ``python -m cotune.trial.describe`` in
a child process (the search side never imports torch or transformers), which reports the
config fields cotune will pass, the objective, the shape, the parameter count and the
reason each layout knob cannot run. ``derive`` turns those reasons into infeasible
configs before launch. Descriptions of ``hf:`` models are cached by their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cotune import __version__
from cotune.config import KERNELS
from cotune.errors import UserError
from cotune.runner import child_env

DESCRIBE_TIMEOUT_S = 600.0  # building an 8B model on the meta device takes seconds; importing a user's code may take more


@dataclass(frozen=True)
class WorkloadInfo:
    """A study's model as the search sees it (see the module docstring)."""

    model: str
    config: dict[str, Any]
    objective: str
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int | None = None
    ffn_hidden: int | None = None
    n_params: int | None = None
    unsupported: dict[str, str] = field(default_factory=dict)  # knob -> why it cannot run ('' or absent: it can)
    kernels: tuple[str, ...] = KERNELS  # Triton kernels that fit the model (the built-in GPT: all)
    layers: str | None = None
    tp_plan: dict[str, str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # family, architecture, layer class, ...

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def reason(self, knob: str) -> str:
        return self.unsupported.get(knob, "")


def describe(
    spec: Any, *, vocab_size: int, eot_id: int | None = None, pad_id: int | None = None,
    cache_dir: Path | None = None,
) -> WorkloadInfo:
    """The WorkloadInfo of a space's ``workload`` (a WorkloadSpec) for a tokenizer of ``vocab_size``.

    A bad model, config field or user function is a UserError naming the field.
    """
    if spec.model == "gpt":
        return WorkloadInfo(model="gpt", config={}, objective="causal_lm", vocab_size=vocab_size,
                            n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head,
                            layers="blocks", notes={"family": "gpt", "architecture": "GPT (cotune.trial.model)"})
    request = {"model": spec.model, "config": spec.config, "seq_len": spec.seq_len, "vocab_size": vocab_size,
               "eot_id": eot_id, "pad_id": pad_id, "n_layer": spec.n_layer, "n_embd": spec.n_embd,
               "n_head": spec.n_head}
    cache = _cache_path(request, cache_dir) if spec.model.startswith("hf:") and cache_dir is not None else None
    if cache is not None and cache.is_file():
        out = json.loads(cache.read_text())
    else:
        out = _run_describe(request)
        if "error" in out:
            raise UserError(out["error"])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(cache)
    missing = [k for k in ("n_layer", "n_embd", "n_head") if out.get(k) is None]
    if missing:
        raise UserError(f"workload {spec.model!r}: give {', '.join(missing)} in the space's workload "
                        "(cotune could not read them off the model, and FLOPs and layout rules need them)")
    return WorkloadInfo(
        model=spec.model, config=out["config"], objective=out["objective"], vocab_size=out["vocab_size"],
        n_layer=out["n_layer"], n_embd=out["n_embd"], n_head=out["n_head"], n_kv_head=out.get("n_kv_head"),
        ffn_hidden=out.get("ffn_hidden"), n_params=out.get("n_params"), unsupported=out["unsupported"],
        kernels=tuple(out["kernels"]), layers=out.get("layers"), tp_plan=out.get("tp_plan"), notes=out.get("notes", {}),
    )


def _cache_path(request: dict[str, Any], cache_dir: Path) -> Path:
    """Keyed by the request, the versions that decide the answer, and a local folder's config."""
    versions = {"cotune": __version__, "transformers": _version("transformers"), "torch": _version("torch")}
    folder = Path(request["model"].removeprefix("hf:")).expanduser()
    local = (folder / "config.json").read_bytes().hex() if (folder / "config.json").is_file() else ""
    key = hashlib.sha256(json.dumps([request, versions, local], sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / "workloads" / f"{key}.json"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _run_describe(request: dict[str, Any]) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, "-m", "cotune.trial.describe"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=DESCRIBE_TIMEOUT_S, env=child_env())
    except subprocess.TimeoutExpired:
        raise UserError(f"workload {request['model']!r}: building it took longer than {DESCRIBE_TIMEOUT_S:g} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise UserError(f"workload {request['model']!r}: describing it failed (exit code {done.returncode}): {tail}")
    return json.loads(lines[-1])
