"""Export: a study's chosen config translated for the trainer people run.

Each format is a plain callable ``(TrialConfig) -> Exported`` registered by name in
``EXPORTERS`` with ``@register("name")``. Every module of this package except the
helpers below is an exporter and is loaded here, so a new trainer is one new file;
a user's own exporter is passed as ``--format package.module:function``. Exporters
write text and list every knob the target cannot express; they never import the
target library or torch.
"""

from __future__ import annotations

import importlib
import pkgutil

from cotune.export.base import EXPORTERS, Exported, ExportFn, export, get_exporter, register

__all__ = ["EXPORTERS", "ExportFn", "Exported", "export", "get_exporter", "register"]

_HELPERS = {"architecture", "base", "pick"}  # modules here that register no format
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
