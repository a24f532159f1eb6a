"""Triton kernels a trial can swap into the model: fused linear + bias + GELU (``mlp``),
cross-entropy (``cross_entropy``) and LayerNorm (``layernorm``); ``apply`` swaps them in,
``timing`` measures them at a trial's shapes.

Each is a torch.autograd.Function with a Triton forward and backward whose tile values come
from the TrialConfig as plain arguments (no autotuning inside a trial). On CPU they run in
Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before triton is first imported
(the runner sets it for a CPU trial that selects a kernel). The tile rules live in
:mod:`cotune.tiles`, which the search side uses without importing torch or triton.
This ``__init__`` imports nothing.
"""
