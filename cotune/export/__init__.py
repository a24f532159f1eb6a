"""Export: a study's chosen config translated for the trainer people run.

Each format is a plain callable ``(TrialConfig) -> Exported`` registered by name in
``EXPORTERS``; a new trainer is one module here using ``@register("name")`` (and its
name in ``_BUILTIN``), or a user's ``package.module:function`` passed as the format.
Exporters write text and list every knob the target cannot express; they never
import the target library or torch.
"""

from __future__ import annotations

import importlib

from cotune.export.base import EXPORTERS, Exported, ExportFn, export, get_exporter, register

__all__ = ["EXPORTERS", "ExportFn", "Exported", "export", "get_exporter", "register"]

# Modules that register the shipped formats, in the order `--help` lists them.
_BUILTIN = ("json_config", "hf", "lightning", "deepspeed", "torchtitan", "accelerate", "megatron")
for _module in _BUILTIN:
    importlib.import_module(f"cotune.export.{_module}")
