"""``json``: the TrialConfig itself, exactly what ``cotune trial CONFIG.json`` runs."""

from __future__ import annotations

from cotune.config import TrialConfig
from cotune.export.base import Exported, register


@register("json")
def export_json(config: TrialConfig) -> Exported:
    """The config's own JSON; it expresses every knob, so nothing is listed as lost."""
    return Exported(text=config.to_json() + "\n", unexpressed=[], suffix=".json")
