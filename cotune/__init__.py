"""cotune: joint hardware / software / algorithm autotuning for LLM training."""

from __future__ import annotations

__version__ = "0.1.0"
