"""An analytic estimate of each rank's peak memory, used before launch and beside every measurement.

The search calls :func:`estimate` on a derived TrialConfig, :func:`fits` against the
device's :func:`capacity_bytes`, and records a config that cannot fit as ``infeasible``
with the figures; for a trial that runs, the estimate is stored beside the measured peak.
Nothing here imports torch.

What is counted, per rank, in bytes:

- parameters, gradients, AdamW's two moments: fp32 whatever the compute precision
  (autocast keeps fp32 master weights), divided by ``fsdp`` (FSDP2 shards all three);
  tensor parallel divides the block matmuls (Megatron-LM's split), not the embeddings,
  norms or row-parallel biases; a pipeline rank holds its stages' layers, the
  embeddings on the first stage and the final norm + lm_head on the last.
- activations: what autograd saves for backward, per layer per token, counted
  tensor by tensor for :mod:`cotune.trial.model` (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", eq. 2, start from 34·s·b·h
  bytes per layer in fp16 without the 5·a·s² attention term that fused SDPA does not
  store; this model differs: no dropout masks, an fp32 residual stream under autocast,
  separate q/k/v projections). Times the microbatches in flight on the rank (pipeline
  schedule), with activation checkpointing only each block's input plus one block
  recomputed during backward.
- logits: the loss region on the last stage: log-softmax output and its gradients in
  fp32 (the trial casts the (B, T, V) logits to float for the cross-entropy).
- buffers: backward temporaries, optimizer temporaries, FSDP's unsharded root and block,
  DDP's gradient buckets, pipeline receive buffers.
- runtime: the process before any model memory (on CPU the anonymous memory of Python +
  torch, as the trial measures its anonymous peak; for the CUDA allocator's peak only the
  cuBLAS workspace). On CPU also glibc's heap slack.

The peak is the largest of the moments of a step where one can fall: the start of the
loss's backward, the backward of a stage's last block (the most activations) and of its
first (the most gradients; with checkpointing, each with one block recomputed), in the
step's first backward (gradients fresh) and a later one (gradients all written), and the
optimizer step; the breakdown is that moment's. Checked on CPU against saved_tensors_hooks
(exact) and a live-tensor tracker over real trials, single- and multi-process (within a
few %: tests/test_memory.py, benchmarks/memory_model.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from cotune.config import TrialConfig

F32 = 4  # bytes: master weights, gradients, optimizer moments, residual stream, LayerNorm statistics
I64 = 8  # bytes: token ids and targets
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per activation element in the compute dtype
GIB = 2**30

# What a CPU trial process holds beyond ``import torch`` before its model exists, in anonymous
# memory (what a CPU trial's peak counts; the libraries' file-backed code pages are not in it):
# torch._dynamo (train.py imports it; every torch.optim optimizer does) is about 76 MiB with
# torch 2.13, numpy, the autograd engine's and the optimizer's first allocations another 2 MiB.
# Measured here (benchmarks/memory_model.py): a one-layer, 16-wide trial peaks at 223.0 MiB
# anonymous over 4 runs (383 MiB RSS); `import torch` alone is 145 MiB anonymous (220 MiB RSS).
CPU_TRIAL_IMPORTS_BYTES = 78 * 2**20
# glibc malloc keeps freed memory in its heap: after the first free of a large (mmapped) block
# its dynamic mmap threshold rises to that size (up to 32 MiB), later tensors come from the heap,
# and the heap's high-water mark ends above the live-tensor peak. Measured with torch 2.13 on
# glibc 2.36 (benchmarks/memory_model.py): a CPU trial's peak beyond the runtime, parameters and
# optimizer state is about 1.3x what an uncheckpointed step's other tensors peak at, and 1.1x that
# same figure with checkpointing (the recomputation churns through as much memory as the
# uncheckpointed step held). With MALLOC_MMAP_THRESHOLD_ fixed it is the live-tensor peak.
# Calibrated on the peak RSS; against the anonymous peak the estimate's part beyond the runtime
# is 4-16% low for the benchmark's one-process 4-layer configs (it was 4-18% low on RSS).
CPU_HEAP_RETENTION = {False: 1.3, True: 1.1}  # by activation_checkpointing
# cuBLAS/cuBLASLt workspaces that torch takes from the caching allocator, so they show in
# torch.cuda.max_memory_allocated (32 MiB per handle on Hopper; less on older GPUs).
CUDA_WORKSPACE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of the fullest rank, in bytes, broken down at the moment of the peak."""

    runtime: float
    parameters: float
    gradients: float  # gradients alive at the peak (all of them when accumulating or at the optimizer step)
    optimizer_state: float
    activations: float  # saved for backward, all microbatches in flight on this rank
    logits: float  # log-softmax output and its gradients, pipeline-retained logits (last stage only)
    buffers: float  # backward/optimizer temporaries, FSDP/DDP/pipeline buffers
    allocator_slack: float  # CPU only: freed memory glibc's heap keeps (see CPU_HEAP_RETENTION)
    total: float
    pp_rank: int  # the pipeline rank whose peak this is (0 without pipelining)
    phase: str  # "loss backward", "backward of the stage's last/first block" or "optimizer step"
    in_flight_microbatches: int  # microbatches whose activations the rank holds at once

    @property
    def tensors(self) -> float:
        """The live-tensor peak without the runtime or CPU heap slack: what a tensor tracker sees."""
        return self.total - self.runtime - self.allocator_slack

    def describe(self) -> str:
        """One line: the total and its parts in GiB, and where it falls."""
        parts = ", ".join(f"{name} {value / GIB:.3g}" for name, value in self._parts().items() if value > 0)
        where = f"pipeline rank {self.pp_rank}, " if self.pp_rank else ""
        return f"estimated peak {self.total / GIB:.3g} GiB per rank ({parts}; {where}at the {self.phase})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _parts(self) -> dict[str, float]:
        return {
            "params": self.parameters, "grads": self.gradients, "optimizer": self.optimizer_state,
            "activations": self.activations, "logits": self.logits, "buffers": self.buffers,
            "runtime": self.runtime, "heap slack": self.allocator_slack,
        }


# --------------------------------------------------------------------------- parameter counts


def n_params(config: TrialConfig) -> int:
    """The whole model's parameters, as ``GPT(...).n_params(non_embedding=False)`` counts them (tied lm_head once)."""
    w = config.workload
    C = w.n_embd
    return int(w.vocab_size * C + w.seq_len * C + w.n_layer * _block_params(C, tp=1) + 2 * C)


def _block_params(C: int, tp: int) -> float:
    """One block on one tensor-parallel rank: 12·C² + 13·C at tp = 1.

    Column-parallel q, k, v, fc split weights and biases; row-parallel proj, mlp.proj split
    weights but keep whole biases; the two LayerNorms (weight + bias) are replicated.
    """
    weights = 12 * C * C / tp  # q, k, v, proj: 4·C²; fc, mlp.proj: 8·C²
    split_biases = 7 * C / tp  # q, k, v: 3·C; fc: 4·C
    whole = 2 * C + 2 * 2 * C  # proj and mlp.proj biases; ln_1, ln_2
    return weights + split_biases + whole


def stage_params(config: TrialConfig, stage: int) -> float:
    """Parameters of pipeline stage ``stage`` (of pp * pp_virtual_stages) on one tp rank, before FSDP sharding."""
    return _rank_params(config, [stage])


def _rank_params(config: TrialConfig, stages: list[int]) -> float:
    w, par = config.workload, config.parallel
    C, n_stages = w.n_embd, par.pp * par.pp_virtual_stages
    n = len(stages) * _layers_per_stage(config) * _block_params(C, par.tp)
    if 0 in stages:
        n += w.vocab_size * C + w.seq_len * C  # wte, wpe
    if n_stages - 1 in stages:
        n += 2 * C  # ln_f
        if n_stages > 1:
            n += w.vocab_size * C  # lm_head: the tied matrix's second copy on the last stage
    return n


def _layers_per_stage(config: TrialConfig) -> int:
    par = config.parallel
    return math.ceil(config.workload.n_layer / (par.pp * par.pp_virtual_stages))


# --------------------------------------------------------------------------- activations


def layer_activation_bytes_per_token(config: TrialConfig) -> float:
    """Bytes one block saves for backward per token of a microbatch (without checkpointing).

    Per token, C = n_embd, H = n_head, a = compute bytes, t = tp:
      2 LayerNorm inputs, fp32 residual stream          2·4·C
      2 LayerNorms' mean and rstd, fp32                 2·2·4
      LayerNorm outputs as the next matmul saves them   a·C·(1 + 1), but under autocast each of
                                                        q, k, v casts ln_1's fp32 output itself: a·C·(3 + 1)
      q, k, v, attention output (= proj input)          4·a·C / t
      fc output (GELU input), GELU output (proj input)  8·a·C / t
      SDPA's log-sum-exp, fp32                          4·H / t   (no T x T matrix: flash/efficient paths)
    With sequence parallel the first two (the residual stream and the LayerNorm statistics)
    hold T / t positions: divide them by t. The matmuls save the gathered (B, T, C) input.
    fp32: 64·C + 16 + 4·H; bf16/fp16 autocast: 40·C + 16 + 4·H (the residual stream and the
    statistics stay fp32), against Korthikanti's 34·C in fp16 with dropout masks.
    """
    w, par = config.workload, config.parallel
    C, t = w.n_embd, par.tp
    a = COMPUTE_BYTES[config.precision.precision]
    ln_out_copies = 1 if config.precision.precision == "fp32" else 3
    residual = (2 * F32 * C + 2 * 2 * F32) / _seq_shards(config)
    return residual + a * C * (ln_out_copies + 1) + 12 * a * C / t + F32 * w.n_head / t


def _seq_shards(config: TrialConfig) -> int:
    """How many ways the residual stream is split along the sequence (tp under sequence parallel)."""
    par = config.parallel
    return par.tp if par.sequence_parallel else 1


def saved_activation_bytes(config: TrialConfig) -> float:
    """What autograd saves for one micro batch's forward and loss on one process, parameters excluded.

    Exactly what ``torch.autograd.graph.saved_tensors_hooks`` sees (distinct storages),
    including the compute-dtype copies of the weights that autocast makes.
    """
    w = config.workload
    tokens = config.batch.micro_batch_size * w.seq_len
    ckpt = config.software.activation_checkpointing
    per_layer = F32 * w.n_embd if ckpt else layer_activation_bytes_per_token(config)
    saved = tokens * (w.n_layer * per_layer + _first_stage_per_token() + _last_stage_per_token(config))
    saved += I64 * w.seq_len  # the position ids (T,) the wpe lookup saves
    return saved + _weight_copies(config, blocks=0 if ckpt else w.n_layer, lm_head=True)


def _first_stage_per_token() -> float:
    return I64  # wte saves the token ids


def _last_stage_per_token(config: TrialConfig) -> float:
    """ln_f input (fp32) and statistics, lm_head input, log-softmax output (fp32), targets."""
    w = config.workload
    a = COMPUTE_BYTES[config.precision.precision]
    return F32 * w.n_embd + 2 * F32 + a * w.n_embd + F32 * w.vocab_size + I64


def _weight_copies(config: TrialConfig, *, blocks: int, lm_head: bool) -> float:
    """Autocast's compute-dtype copies of matmul weights, saved for backward (0 in fp32).

    Copies of what the forward sees: the tp-local, FSDP-unsharded weight.
    """
    if config.precision.precision == "fp32":
        return 0.0
    w, a = config.workload, COMPUTE_BYTES[config.precision.precision]
    n = blocks * 12 * w.n_embd**2 / config.parallel.tp + (w.vocab_size * w.n_embd if lm_head else 0)
    return a * n


def in_flight(config: TrialConfig, pp_rank: int) -> int:
    """Stage chunks whose activations pipeline rank ``pp_rank`` holds at once (1 without pipelining).

    As torch.distributed.pipelining schedules them: GPipe runs every forward first (m);
    1F1B warms up min(m, pp - rank) forwards before its first backward; interleaved 1F1B
    warms up (v - 1)·pp + 2·(pp - 1 - rank) virtual-stage chunks, capped at m·v, plus the
    one it runs before its first backward (Narayanan et al. 2021; Korthikanti §4.2.3).
    """
    par = config.parallel
    if par.pp == 1:
        return 1
    m, pp, v = par.pp_microbatches, par.pp, par.pp_virtual_stages
    if par.pp_schedule == "gpipe":
        return m * v
    if par.pp_schedule == "interleaved1f1b":
        return min((v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1, m * v)
    return min(m, pp - pp_rank)


# --------------------------------------------------------------------------- the peak


def estimate(config: TrialConfig, *, runtime_bytes: float = 0.0) -> MemoryEstimate:
    """The peak memory of the fullest rank of ``config``; ``runtime_bytes`` is what a process holds before any model.

    Pass :func:`runtime_bytes` of the fingerprint: a CPU trial's peak RSS includes the
    interpreter and torch, the CUDA allocator's peak does not.
    """
    ranks = [_rank_peak(config, r, runtime_bytes) for r in range(config.parallel.pp)]
    if config.run.device == "cpu":
        ranks = [_with_cpu_heap_slack(config, e) for e in ranks]
    return max(ranks, key=lambda e: e.total)


def _with_cpu_heap_slack(config: TrialConfig, e: MemoryEstimate) -> MemoryEstimate:
    """Add what glibc's heap keeps beyond the live tensors (CPU_HEAP_RETENTION): an empirical term."""
    sw = config.software
    plain = config if not sw.activation_checkpointing else replace(
        config, software=replace(sw, activation_checkpointing=False))
    p = _rank_peak(plain, e.pp_rank, 0.0)
    churn = p.total - p.runtime - p.parameters - p.optimizer_state  # what a plain step allocates and frees
    live = e.total - e.runtime - e.parameters - e.optimizer_state
    slack = max(0.0, CPU_HEAP_RETENTION[sw.activation_checkpointing] * churn - live)
    return replace(e, allocator_slack=slack, total=e.total + slack)


def _rank_peak(config: TrialConfig, pp_rank: int, runtime_bytes: float) -> MemoryEstimate:
    w, par, b = config.workload, config.parallel, config.batch
    C, V = w.n_embd, w.vocab_size
    a = COMPUTE_BYTES[config.precision.precision]
    ckpt, cuda = config.software.activation_checkpointing, config.run.device == "cuda"
    pipelined, n_stages = par.pp > 1, par.pp * par.pp_virtual_stages
    stages = [pp_rank + k * par.pp for k in range(par.pp_virtual_stages)] if pipelined else [0]
    first, last = 0 in stages, n_stages - 1 in stages
    m = par.pp_microbatches if pipelined else 1
    tokens = math.ceil(b.micro_batch_size / m) * w.seq_len  # tokens of one (pipeline) microbatch
    layers = _layers_per_stage(config)
    chunks = in_flight(config, pp_rank)
    uses_fsdp = par.fsdp > 1 or (par.dp > 1 and (par.tp > 1 or pipelined))  # see trial/parallelize.py

    # Parameters, gradients, AdamW moments: fp32, sharded by FSDP.
    local = _rank_params(config, stages)
    params = F32 * local / par.fsdp
    grads_all = F32 * local / par.fsdp
    optimizer = 2 * F32 * local / par.fsdp

    # Saved activations, per microbatch in flight: its blocks, the token ids on the first stage,
    # ln_f .. log-softmax on the last (on a 1F1B last stage only one microbatch is ever in flight).
    per_layer = F32 * C / _seq_shards(config) if ckpt else layer_activation_bytes_per_token(config)
    block_acts = tokens * per_layer  # one block of one microbatch
    embed = tokens * _first_stage_per_token() if first else 0.0
    final = tokens * _last_stage_per_token(config) if last else 0.0

    def held(n: int) -> float:
        """Activations of n microbatches in flight, the one in backward included."""
        n_last = n if (not pipelined or par.pp_schedule == "gpipe") else 1
        return n * layers * block_acts + min(n, m) * embed + n_last * final

    # Autocast's weight copies live as long as the autocast context: one micro batch on one
    # process, the whole schedule.step when pipelined (recomputation hits the same cache).
    all_blocks = layers * len(stages)
    copies = _weight_copies(config, blocks=all_blocks if (pipelined or not ckpt) else 0, lm_head=last)
    # At the stage's first block the current microbatch has only that block's activations left
    # (and, on one process without checkpointing, only that block's weight copies).
    copies_left = copies if (pipelined or ckpt) else _weight_copies(config, blocks=1, lm_head=False)
    spent = (layers - 1) * block_acts + final  # what the current microbatch has freed by then

    # Loss region (last stage): nll's and log-softmax's gradients, (B, T, V) fp32 each, beside
    # the saved log-softmax output; a pipeline's last stage also keeps every microbatch's logits
    # for the step (the schedule's output chunks).
    loss_temps = 2 * F32 * V * tokens if last else 0.0
    retained_logits = a * V * tokens * m if (last and pipelined) else 0.0

    # Block backward: the incoming residual gradient (fp32) and the GELU input/output gradients
    # beside the freed GELU output: 4·C + 4·a·C/t per token. With checkpointing the block is
    # recomputed first: one layer's full activations (and its weight copies on one process).
    block_temps = tokens * (F32 * C / _seq_shards(config) + 4 * a * C / par.tp)
    if ckpt:
        # (less the block's input, which the checkpoint saved already and ln_1 saves again)
        block_temps += tokens * (layer_activation_bytes_per_token(config) - F32 * C / _seq_shards(config))
        block_temps += 0.0 if pipelined else _weight_copies(config, blocks=1, lm_head=False)
    if uses_fsdp:
        block_temps += F32 * _block_params(C, par.tp)  # FSDP2 writes a block's gradient unsharded, then reduce-scatters
    new_grad = F32 * 4 * C * C / par.tp  # mlp.proj's weight gradient before it is added to an existing .grad

    # Buffers alive through the step.
    persistent = 0.0
    if par.dp > 1 and not uses_fsdp:
        persistent += grads_all  # DDP's gradient buckets (gradient_as_bucket_view=False)
    if pipelined:
        inputs = F32 * C * tokens
        for s in stages:
            persistent += (m - min(m, chunks)) * inputs if s != 0 else 0.0  # activation receive buffers
            persistent += m * inputs if s != n_stages - 1 else 0.0  # gradient receive buffers
        persistent += chunks * inputs if not last else 0.0  # stage outputs kept for backward
    fsdp_temps = 0.0
    if uses_fsdp:
        block = F32 * _block_params(C, par.tp)
        root = F32 * (local - all_blocks * _block_params(C, par.tp))
        fsdp_temps = root + 2 * block  # root unsharded through fwd/bwd; current + prefetched block
    # AdamW: single-tensor on CPU (two temporaries of the largest parameter), fused on one GPU
    # (none), foreach across ranks on GPU (a sqrt of every second moment at once).
    largest = max(V * C if first or (last and pipelined) else 0.0, 4 * C * C / par.tp) / par.fsdp
    if not cuda:
        opt_temps = 2 * F32 * largest
    else:
        opt_temps = 0.0 if par.world_size == 1 else F32 * local / par.fsdp

    # Gradients during backward: the first backward of a step writes them fresh, from none at the
    # loss to all but the first block's q, k, v, proj, fc (8·C²/t) when it is reached; every
    # later one (accumulation, a pipeline's later microbatches) finds them all. The first backward
    # comes with the most microbatches in flight; a later one with as many only if the schedule
    # still runs forwards after it (1F1B's steady state), else one fewer.
    fresh = (0.0, F32 * ((V * C if last else 0.0) + 4 * C * C / par.tp) / par.fsdp,
             max(0.0, grads_all - F32 * (8 * C * C / par.tp) / par.fsdp))
    full = (grads_all, grads_all, grads_all)
    if b.grad_accum_steps > 1:
        backwards = [(chunks, full)]
    elif pipelined and m > 1:
        backwards = [(chunks, fresh), (chunks if chunks < m * par.pp_virtual_stages else chunks - 1, full)]
    else:
        backwards = [(chunks, fresh)]

    # The moments a peak can fall at: (phase, gradients, activations, logits, buffers).
    bwd_buffers = persistent + fsdp_temps
    phases = [("optimizer step", grads_all, 0.0, retained_logits, persistent + opt_temps)]
    for n, (g_loss, g_last, g_first) in backwards:
        accumulate = new_grad if (g_last == grads_all and not uses_fsdp) else 0.0
        acts = held(n) + copies
        if last:
            phases.append(("loss backward", g_loss, acts, loss_temps + retained_logits, bwd_buffers))
        phases.append(("backward of the stage's last block", g_last, acts - final, retained_logits,
                       bwd_buffers + block_temps + accumulate))
        phases.append(("backward of the stage's first block", g_first, acts - spent - copies + copies_left,
                       retained_logits, bwd_buffers + block_temps + accumulate))
    phase, grads, activations, logits, buffers = max(phases, key=lambda p: sum(p[1:]))
    runtime = runtime_bytes + (CUDA_WORKSPACE_BYTES if cuda else 0.0)
    total = runtime + params + optimizer + grads + activations + logits + buffers
    return MemoryEstimate(
        runtime=runtime, parameters=params, gradients=grads, optimizer_state=optimizer,
        activations=activations, logits=logits, buffers=buffers, allocator_slack=0.0, total=total,
        pp_rank=pp_rank, phase=phase, in_flight_microbatches=chunks,
    )


# --------------------------------------------------------------------------- capacity


def runtime_bytes(fingerprint: dict[str, Any], device: str) -> float:
    """What a trial process holds before its model: 0 on CUDA (the allocator's peak), else
    the fingerprint's anonymous memory after ``import torch`` plus what a trial imports beyond it.

    A fingerprint without the anonymous figure (taken off Linux, or by an older cotune) gives its
    RSS instead, which also counts torch's file-backed code (about 75 MiB more with torch 2.13).
    """
    if device == "cuda":
        return 0.0
    hw = fingerprint["hardware"]
    anonymous = hw.get("cpu_runtime_anonymous_bytes")
    return float(hw.get("cpu_runtime_bytes", 0) if anonymous is None else anonymous) + CPU_TRIAL_IMPORTS_BYTES


def capacity_bytes(fingerprint: dict[str, Any], device: str, nproc: int) -> float:
    """Memory one rank may use: its GPU's memory on CUDA (the smallest of the first ``nproc``),
    else the host's memory shared by ``nproc`` processes."""
    hw = fingerprint["hardware"]
    if device == "cuda":
        gpus = hw["gpus"][: max(1, nproc)]
        if not gpus:
            raise ValueError(f"device cuda needs at least one GPU in the fingerprint, but got gpus={hw['gpus']}")
        return float(min(g["memory_bytes"] for g in gpus))
    return float(hw["memory_bytes"]) / max(1, nproc)


def fits(estimate: MemoryEstimate, capacity_bytes: float) -> str:
    """"" when the estimate fits ``capacity_bytes``, else one sentence with the figures."""
    if estimate.total <= capacity_bytes:
        return ""
    listed = ", ".join(f"{name} {value / GIB:.3g}" for name, value in estimate._parts().items() if value > 0)
    where = f" on pipeline rank {estimate.pp_rank}" if estimate.pp_rank else ""
    return (
        f"estimated peak {estimate.total / GIB:.3g} GiB per rank{where} ({listed}) "
        f"exceeds the device's {capacity_bytes / GIB:.3g} GiB"
    )
