"""The exporter registry and what every exporter shares.

An exporter is a plain callable ``(TrialConfig) -> Exported`` registered under a
format name. It writes text for a trainer and lists every knob that text cannot
express; it never imports the target library (or torch): exporting only reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from cotune.config import TrialConfig
from cotune.errors import UserError


@dataclass(frozen=True)
class Exported:
    """One exported file: its text, what it cannot express, and the file suffix it wants."""

    text: str
    unexpressed: list[str]  # one line per knob the target cannot express: "section.knob=value: why"
    suffix: str  # ".json", ".yaml", ".toml", ".args"


ExportFn = Callable[[TrialConfig], Exported]

EXPORTERS: dict[str, ExportFn] = {}


def register(name: str) -> Callable[[ExportFn], ExportFn]:
    """Decorator: register ``fn`` as the exporter for format ``name``."""

    def add(fn: ExportFn) -> ExportFn:
        if name in EXPORTERS:
            raise ValueError(f"exporter {name!r} is registered twice")
        EXPORTERS[name] = fn
        return fn

    return add


def get_exporter(name: str) -> ExportFn:
    """The exporter registered as ``name``, or imported from ``package.module:function``."""
    if name in EXPORTERS:
        return EXPORTERS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as e:
            raise UserError(f"--format {name!r}: cannot import {module_name} ({e})") from None
        if callable(fn):
            return fn
    raise UserError(
        f"--format {name!r} is not a known format; valid formats are {', '.join(EXPORTERS)} "
        "or a 'package.module:function' that takes a TrialConfig and returns an Exported"
    )


def export(config: TrialConfig, fmt: str) -> Exported:
    """Translate ``config`` into the format ``fmt``."""
    return get_exporter(fmt)(config)


# --- helpers shared by the exporters -------------------------------------------------------


def budget_steps(config: TrialConfig) -> int:
    """Optimizer steps the trial's schedule spans: ceil(token_budget / (global batch * seq_len)), as in the trial."""
    return config.budget_steps


def warmup_steps(config: TrialConfig) -> int:
    """Warm-up steps as the trial counts them: round(warmup_fraction * budget_steps)."""
    return round(config.optimizer.warmup_fraction * budget_steps(config))


MIN_LR_RATIO = 0.1  # the trial's cosine decays to 10% of the peak learning rate
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the trial uses
MASK_RATE = 0.15  # masked_lm: the share of tokens the trial predicts (BERT's 80/10/10 replacement, cotune.trial.batches)


def knob(path: str, value: object, why: str) -> str:
    """One unexpressed-knob line: ``parallel.tp=2: why``."""
    if isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, float):
        shown = f"{value:.6g}"
    else:
        shown = str(value)
    return f"{path}={shown}: {why}"


def pipeline_micro_batch(config: TrialConfig) -> int:
    """Sequences per pipeline micro-batch: each micro batch is split into pp_microbatches pieces."""
    par = config.parallel
    return config.batch.micro_batch_size // par.pp_microbatches if par.pp > 1 else config.batch.micro_batch_size


def pipeline_value(config: TrialConfig) -> str:
    """The pipeline knobs together, for one unexpressed line: ``2 (pp_schedule=1f1b, ...)``."""
    par = config.parallel
    return (f"{par.pp} (pp_schedule={par.pp_schedule}, pp_microbatches={par.pp_microbatches}, "
            f"pp_virtual_stages={par.pp_virtual_stages})")


def launcher_note(config: TrialConfig, how: str) -> list[str]:
    """The process count, for targets whose file cannot hold it; empty for one process."""
    world = config.parallel.world_size
    if world == 1:
        return []
    return [f"world size={world} (dp*fsdp*tp*pp): the launcher sets the process count, e.g. {how}"]


def kernel_notes(config: TrialConfig) -> list[str]:
    """One line per op the trial ran as cotune's Triton kernel: a trainer runs its own op there."""
    k = config.kernels
    tiles = {"mlp": f"BLOCK_M={k.mlp_block_m}, BLOCK_N={k.mlp_block_n}, BLOCK_K={k.mlp_block_k}, GROUP_M={k.mlp_group_m}, "
                    f"num_warps={k.mlp_num_warps}, num_stages={k.mlp_num_stages}",
             "cross_entropy": f"BLOCK_SIZE={k.ce_block_size}, num_warps={k.ce_num_warps}",
             "layernorm": f"BLOCK_SIZE={k.ln_block_size}, num_warps={k.ln_num_warps}"}
    return [knob(f"kernels.{name}", "triton", f"the trainer runs its own op; cotune's kernel ran with {tiles[name]} "
                 f"(cotune.trial.kernels, importable into a model of your own)") for name in k.selected()]


def comment_header(title: str, usage: str, unexpressed: list[str]) -> str:
    """A ``#`` comment block: what the file is, how to use it, and what it leaves out."""
    lines = [f"# {title}", f"# Use: {usage}"]
    if unexpressed:
        lines.append("# Not expressed by this file (set these yourself):")
        lines += [f"#   - {item}" for item in unexpressed]
    else:
        lines.append("# Every tuned knob is expressed below.")
    return "\n".join(lines) + "\n"
