"""Display labels: the one name each objective, metric and knob goes by in tables, the report and messages.

Keys are the names cotune records: objective names (``peak_memory``), metric keys
(``peak_memory_bytes``) and knob names as ``TrialConfig.flat`` gives them. A name with no
label here shows as itself. Nothing here imports more than the standard library, so the
terminal tables, the report and ``cotune export`` all read the same map.
"""

from __future__ import annotations

LABELS: dict[str, str] = {
    # objectives and the metrics that hold them
    "tokens_per_second": "tokens/s",
    "val_loss": "val loss",
    "peak_memory": "peak memory",
    "peak_memory_bytes": "peak memory",
    "mfu": "MFU",
    "time_to_loss": "time to loss",
    "time_to_loss_s": "time to loss",
    # knobs, short enough for a table column
    "micro_batch_size": "micro",
    "global_batch_size": "global",
    "grad_accum_steps": "accum",
    "learning_rate": "lr",
    "warmup_fraction": "warmup",
    "weight_decay": "wd",
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "activation_checkpointing": "ckpt",
    "precision": "prec",
    "world_size": "world",
    "sequence_parallel": "sp",
    "pp_schedule": "sched",
    "pp_microbatches": "mbs",
    "pp_virtual_stages": "vst",
}

# The metric columns a table of trials shows (terminal and report), in this order.
TABLE_METRICS = ("tokens_per_second", "val_loss", "peak_memory_bytes", "mfu")

# The tag of each objective's best point on a front (several objectives; a single one is "best").
BEST_LABELS: dict[str, str] = {"tokens_per_second": "fastest", "val_loss": "lowest loss", "peak_memory": "least memory",
                               "time_to_loss": "soonest to the target loss"}


def label(name: str) -> str:
    """How ``name`` (an objective, metric or knob) is shown."""
    return LABELS.get(name, name)
