"""The space's declared baseline config, whether the study measured it, and what differs from it.

Trials are compared as they *ran* (the config after derivation: dp from the world size,
the accumulation steps, knobs left out filled in), so the baseline is derived the same
way the search derives a trial.
"""

from __future__ import annotations

import math
from typing import Any

from cotune.derive import build_config
from cotune.space import SearchSpace

# Computed from the knobs: equal whenever the knobs are, and not something a user sets.
DERIVED_ONLY = ("dp", "grad_accum_steps")
# Pipeline settings that mean nothing without a pipeline (pp == 1).
PIPELINE_ONLY = ("pp_schedule", "pp_microbatches", "pp_virtual_stages")


def baseline_knobs(space: dict[str, Any], world_size: int, vocab_size: int) -> tuple[dict[str, Any], list[str]]:
    """(the baseline's knob values as a trial would run them, the knobs the YAML ``baseline:`` names).

    Knobs the baseline does not name take the space's fixed value, else cotune's default,
    as the search would give them. Empty when the study records no baseline.
    """
    declared = dict(space.get("baseline") or {})
    if not declared:
        return {}, []
    fixed = {}
    for name, domain in (space.get("knobs") or {}).items():
        if domain.get("choices") is not None and len(domain["choices"]) == 1:
            fixed[name] = domain["choices"][0]
        elif domain.get("choices") is None and domain.get("low") == domain.get("high"):
            fixed[name] = domain.get("low")
    values = {**fixed, **declared}
    try:
        config, _ = build_config(SearchSpace.model_validate(space), values, world_size=world_size,
                                 vocab_size=vocab_size)
    except (ValueError, TypeError, KeyError):  # a space recorded by an older cotune that no longer validates
        config = None
    if config is None:
        return values, list(declared)
    return config.flat(), list(declared)


def same_value(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative (a value that went through JSON and back)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def differences(knobs: dict[str, Any], baseline: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(knob, baseline value, this value) for each knob both set that differs, leaving out derived
    values and pipeline settings where neither runs a pipeline."""
    no_pipeline = knobs.get("pp", 1) == 1 and baseline.get("pp", 1) == 1
    return [(name, base, knobs[name]) for name, base in baseline.items()
            if name in knobs and name not in DERIVED_ONLY and not (no_pipeline and name in PIPELINE_ONLY)
            and not same_value(knobs[name], base)]


def is_baseline(knobs: dict[str, Any], baseline: dict[str, Any], declared: list[str]) -> bool:
    """Did a trial run exactly the baseline config (every named knob present, nothing different)?"""
    return bool(baseline) and all(n in knobs for n in declared) and not differences(knobs, baseline)
