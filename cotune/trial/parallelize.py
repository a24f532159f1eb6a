"""Parallelism applied to the model from outside, torchtitan's order: split into pipeline
stages, then tensor parallel, activation checkpointing, compile, data parallel.

- Pipeline (pp): the layers are cut into pp * virtual stages of equal depth; stage s
  lives on pipeline rank s % pp. A stage is a copy of the GPT with the parts it does
  not own set to None. The tied embedding / lm_head matrix then lives on the first and
  the last stage, and their gradients are summed across the two after each step, so
  the pair stays one matrix, as in the single-process model.
- Tensor parallel (tp): q, k, v and the MLP's first matmul column-wise, the two output
  projections row-wise (Megatron-LM's split), so one all-reduce per sub-layer. With
  sequence parallel (Korthikanti et al. 2022) the LayerNorms and the residual stream
  between sub-layers hold T / tp positions per rank: each all-reduce becomes a
  reduce-scatter after the sub-layer and an all-gather before the next, the same bytes
  on the wire, and those activations take 1 / tp of the memory. The first stage cuts its
  embeddings' output along the sequence; the last gathers it again before ln_f.
- Data parallel: FSDP2 ``fully_shard`` per block and at the root when fsdp > 1 (HSDP on
  the 2-D dp_replicate x dp_shard mesh when dp > 1 too); DDP for pure replication of a
  whole model; replication next to tp or pp uses the 2-D FSDP2 mesh with a shard size of 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from cotune.config import TrialConfig
from cotune.trial.distributed import Dist
from cotune.trial.workloads import apply_activation_checkpointing

TP_PLAN_NAMES = {"attn.q": "col", "attn.k": "col", "attn.v": "col", "attn.proj": "row",
                 "mlp.fc": "col", "mlp.proj": "row"}


@dataclass
class Parallel:
    """The model as this rank holds it: its stage modules and, for pp > 1, the schedule."""

    modules: list[nn.Module]  # [the whole model] without pipelining, else this rank's stages
    stage_ids: list[int]
    num_stages: int
    schedule: object | None = None  # a torch.distributed.pipelining schedule when pp > 1
    tie_group: dist.ProcessGroup | None = None  # first and last pipeline stage, same dp/tp coordinate
    tied: list[nn.Parameter] = field(default_factory=list)  # this rank's copies of the tied matrix

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


def parallelize(
    model: nn.Module, config: TrialConfig, d: Dist, loss_fn: Callable | None = None
) -> Parallel:
    """Apply the config's layout to ``model`` (the full model, identically initialised on every rank)."""
    par, sw = config.parallel, config.software
    num_stages = par.pp * par.pp_virtual_stages
    stage_ids = [d.pp_rank + k * par.pp for k in range(par.pp_virtual_stages)] if par.pp > 1 else [0]
    modules = [_stage(model, s, num_stages) for s in stage_ids] if par.pp > 1 else [model]
    for i, m in enumerate(modules):
        if par.tp > 1:
            _apply_tp(m, d, par.sequence_parallel, first=stage_ids[i] == 0, last=stage_ids[i] == num_stages - 1)
        if sw.activation_checkpointing:
            apply_activation_checkpointing(m)
        if sw.compile:
            for j, block in enumerate(m.blocks):
                m.blocks[j] = torch.compile(block)
        modules[i] = _apply_data_parallel(m, config, d)
    out = Parallel(modules=modules, stage_ids=stage_ids, num_stages=num_stages)
    if par.pp > 1:
        out.schedule = _schedule(out, config, d, loss_fn)
        out.tie_group = _tie_group(d, par.pp)
        if out.has_first:
            out.tied.append(_unwrap(modules[stage_ids.index(0)]).wte.weight)
        if out.has_last:
            out.tied.append(_unwrap(modules[stage_ids.index(num_stages - 1)]).lm_head.weight)
    return out


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """A copy of the model holding only stage ``stage``'s layers (and the ends it owns)."""
    n_layer = len(model.blocks)
    per = n_layer // num_stages
    m = copy.deepcopy(model)
    m.blocks = nn.ModuleList(list(m.blocks)[stage * per:(stage + 1) * per])
    if stage != 0:
        m.wte = None
        m.wpe = None
    if stage != num_stages - 1:
        m.ln_f = None
        m.lm_head = None
    return m


def _apply_tp(m: nn.Module, d: Dist, sequence_parallel: bool, *, first: bool, last: bool) -> None:
    """Megatron's split of every block over the tp mesh, with or without sequence parallel.

    ``first`` / ``last`` say whether this module holds the embeddings / ln_f and lm_head
    (the whole model, or a pipeline stage at either end).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = d.mesh["tp"]
    if not sequence_parallel:
        styles = {"col": ColwiseParallel, "row": RowwiseParallel}
        plan = {name: styles[kind]() for name, kind in TP_PLAN_NAMES.items()}
        for block in m.blocks:
            parallelize_module(block, mesh, plan)
        return
    # Residual stream (B, T / tp, C) per rank between sub-layers. Each sub-layer gathers its
    # input to (B, T, C) once (not once per q, k, v), and its row-wise output projection
    # reduce-scatters back to (B, T / tp, C).
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    # The residual additions mix these with plain tensors, so the ends hand on local tensors.
    local = {"use_local_output": True}
    plan = {
        "ln_1": SequenceParallel(), "attn": gather, "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(), "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "ln_2": SequenceParallel(), "mlp": gather, "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in m.blocks:
        parallelize_module(block, mesh, plan)
    if first:  # the embeddings' (B, T, C) sum, the same on every tp rank, is cut to this rank's T / tp
        cut = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), **local)
        parallelize_module(m.blocks[0], mesh, cut)
    if last:  # ln_f and lm_head see the whole sequence (lm_head is tied to wte: not split)
        whole = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), **local)
        parallelize_module(m.ln_f, mesh, whole)


def _apply_data_parallel(m: nn.Module, config: TrialConfig, d: Dist) -> nn.Module:
    par = config.parallel
    if par.dp * par.fsdp == 1:
        return m
    if par.fsdp == 1 and par.tp == 1 and par.pp == 1:
        return nn.parallel.DistributedDataParallel(m, process_group=d.group("dp_replicate"))
    from torch.distributed.fsdp import fully_shard

    mesh = d.mesh["dp_replicate", "dp_shard"] if par.dp > 1 else d.mesh["dp_shard"]
    for block in m.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _schedule(p: Parallel, config: TrialConfig, d: Dist, loss_fn: Callable | None) -> object:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    par = config.parallel
    group = d.group("pp")
    stages = [PipelineStage(m, s, p.num_stages, d.device, group=group) for m, s in zip(p.modules, p.stage_ids)]
    # scale_grads=False: the schedule would divide the whole accumulated .grad after every
    # step() call, so with gradient accumulation earlier micro batches would be divided
    # again. The loss function divides by microbatches * accumulation steps instead.
    if par.pp_schedule == "interleaved1f1b":
        return ScheduleInterleaved1F1B(stages, par.pp_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if par.pp_schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], par.pp_microbatches, loss_fn=loss_fn, scale_grads=False)


def _tie_group(d: Dist, pp: int) -> dist.ProcessGroup | None:
    """The group {first stage, last stage} at this rank's dp/tp coordinate (None elsewhere).

    ``new_group`` must be entered by every rank for every group, in the same order.
    """
    grid = d.mesh.mesh  # (pp, dp_replicate, dp_shard, tp) tensor of global ranks
    mine = None
    for coord in torch.cartesian_prod(*(torch.arange(n) for n in grid.shape[1:])).reshape(-1, 3).tolist():
        ranks = [int(grid[0][tuple(coord)]), int(grid[pp - 1][tuple(coord)])]
        group = dist.new_group(ranks)
        if d.rank in ranks:
            mine = group
    return mine


def sync_tied_grads(p: Parallel) -> None:
    """Sum the tied matrix's gradient over its first- and last-stage copies (pp > 1).

    With pp > 1 the first stage lives on pipeline rank 0 and the last on rank pp - 1,
    so a rank holds at most one copy.
    """
    if p.tie_group is None:
        return
    for param in p.tied:
        grad = param.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=p.tie_group)


def clip_grad_norm(p: Parallel, max_norm: float, d: Dist) -> float:
    """Clip by the global L2 norm over every rank's gradients, exactly as one process would.

    Sharded (DTensor) gradients are reduced over their own mesh; pipeline stages add their
    squares; the tied matrix counts once (its first-stage copy).
    """
    skip = {id(t) for t in p.tied} if p.has_last and not p.has_first else set()
    sq = torch.zeros((), dtype=torch.float64, device=d.device)
    params = [q for q in p.parameters() if q.grad is not None]
    for q in params:
        if id(q) in skip:
            continue
        n = q.grad.norm(2)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq += n.double() ** 2
    if d.pp_size > 1:
        dist.all_reduce(sq, group=d.group("pp"))
    total = math.sqrt(sq.item())
    if not math.isfinite(total):
        return total  # fp16 overflow: the step is skipped, nothing to clip
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for q in params:
            q.grad.mul_(coef)
    return total
