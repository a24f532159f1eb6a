"""Parallelism applied to a workload's model from outside, torchtitan's order: split into
pipeline stages, then tensor parallel, activation checkpointing, compile, data parallel.
What each step needs of the model is in its :class:`~cotune.trial.workloads.Workload`
(the layer list, the TP plan, the stage cutter, the tied matrices); a step whose fact is
missing was rejected before launch, so here a missing fact is a bug and raises.

- Pipeline (pp): the layers are cut into pp * virtual stages of equal depth; stage s
  lives on pipeline rank s % pp and is what ``Workload.stage`` builds for its layers. A
  matrix the model ties (embedding and output head) then lives on the first and the last
  stage, and their gradients are summed across the two after each step, so the pair stays
  one matrix, as in the single-process model.
- Tensor parallel (tp): the workload's plan over one layer: column-wise splits (q, k, v,
  the MLP's up projections) and row-wise ones (the output projections), Megatron-LM's
  split, so one all-reduce per sub-layer. Every plan key must name an nn.Linear of every
  layer, and is checked to be sharded afterwards: a plan that shards nothing is an error.
  With sequence parallel (Korthikanti et al. 2022; the built-in GPT only) the LayerNorms
  and the residual stream between sub-layers hold T / tp positions per rank: each
  all-reduce becomes a reduce-scatter after the sub-layer and an all-gather before the
  next, the same bytes on the wire, and those activations take 1 / tp of the memory. The
  first stage cuts its embeddings' output along the sequence; the last gathers it again.
- Data parallel: FSDP2 ``fully_shard`` per layer and at the root when fsdp > 1 (HSDP on
  the 2-D dp_replicate x dp_shard mesh when dp > 1 too); DDP for pure replication of a
  whole model; replication next to tp or pp uses the 2-D FSDP2 mesh with a shard size of 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from cotune.config import TrialConfig
from cotune.trial.distributed import Dist
from cotune.trial.workloads import Workload, apply_activation_checkpointing


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
    workload: Workload, config: TrialConfig, d: Dist, loss_fn: Callable | None = None
) -> Parallel:
    """Apply the config's layout to the workload's model (built identically on every rank)."""
    par, sw = config.parallel, config.software
    num_stages = par.pp * par.pp_virtual_stages
    stage_ids = [d.pp_rank + k * par.pp for k in range(par.pp_virtual_stages)] if par.pp > 1 else [0]
    staged = par.pp > 1
    modules = [_stage(workload, s, num_stages) for s in stage_ids] if staged else [workload.model]
    for i, m in enumerate(modules):
        layers = workload.layer_list(m, stage=staged) if workload.layers is not None else None
        if par.tp > 1:
            _apply_tp(m, layers, workload, d, par.sequence_parallel, first=stage_ids[i] == 0,
                      last=stage_ids[i] == num_stages - 1)
        if sw.activation_checkpointing:
            apply_activation_checkpointing(layers)
        if sw.compile:
            for j, block in enumerate(layers):
                layers[j] = torch.compile(block)
        modules[i] = _apply_data_parallel(m, layers, config, d)
    out = Parallel(modules=modules, stage_ids=stage_ids, num_stages=num_stages)
    if staged:
        out.schedule = _schedule(out, config, d, loss_fn)
        out.tie_group = _tie_group(d, par.pp)
        if workload.tied is not None:
            first_name, last_name = workload.tied
            if out.has_first:
                out.tied.append(_unwrap(modules[stage_ids.index(0)]).get_parameter(first_name))
            if out.has_last:
                out.tied.append(_unwrap(modules[stage_ids.index(num_stages - 1)]).get_parameter(last_name))
    return out


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _stage(workload: Workload, stage: int, num_stages: int) -> nn.Module:
    """Pipeline stage ``stage`` of ``num_stages``: an equal share of the layers, and the ends it owns."""
    if workload.stage is None:
        raise ValueError(f"pp > 1 needs Workload.stage, but {type(workload.model).__name__}'s workload has none")
    n_layer = len(workload.layer_list())
    per = n_layer // num_stages
    return workload.stage(workload.model, stage * per, (stage + 1) * per, stage == 0, stage == num_stages - 1)


def _apply_tp(m: nn.Module, layers: nn.ModuleList | None, workload: Workload, d: Dist, sequence_parallel: bool,
              *, first: bool, last: bool) -> None:
    """The workload's plan over every layer on the tp mesh, and its sequence-parallel plan if asked for.

    ``first`` / ``last`` say whether this module holds the embeddings / the output head
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

    if layers is None or not workload.tp_plan:
        raise ValueError(f"tp > 1 needs Workload.layers and Workload.tp_plan, but got layers={workload.layers!r}, "
                         f"tp_plan={workload.tp_plan!r}")
    mesh = d.mesh["tp"]
    tp = mesh.size()
    sp = workload.sequence_plan if sequence_parallel else None
    if sequence_parallel and sp is None:
        raise ValueError(f"sequence_parallel needs Workload.sequence_plan, which {type(m).__name__}'s workload has not")
    # With sequence parallel the row-wise output projections reduce-scatter to (B, T / tp, C) instead of
    # all-reducing to (B, T, C); the residual additions mix them with plain tensors, so they hand on local ones.
    styles = {"colwise": ColwiseParallel, "rowwise": (lambda: RowwiseParallel(output_layouts=Shard(1))) if sp
              else RowwiseParallel}
    for layer in layers:
        if workload.tp_prepare is not None:
            workload.tp_prepare(layer, tp)
        for key in workload.tp_plan:
            layer.get_submodule(key)  # AttributeError names a key that matches nothing: never silently
        plan = {key: styles[style]() for key, style in workload.tp_plan.items()}
        if sp is not None:
            # Each sub-layer gathers its input to (B, T, C) once (not once per q, k, v projection).
            kwarg = sp.attention_kwarg
            gather_attn = PrepareModuleInput(
                input_kwarg_layouts={kwarg: Shard(1)}, desired_input_kwarg_layouts={kwarg: Replicate()}
            ) if kwarg else PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan.update({norm: SequenceParallel() for norm in sp.norms})
            plan[sp.attention] = gather_attn
            plan[sp.mlp] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(layer, mesh, plan)
        for key in workload.tp_plan:
            weight = layer.get_submodule(key).weight
            if not isinstance(weight, DTensor) or weight.placements[0] == Replicate():
                raise ValueError(f"tensor-parallel plan key {key!r} was not sharded over tp={tp} "
                                 f"(its weight is {type(weight).__name__})")
    if sp is None:
        return
    local = {"use_local_output": True}
    if first:  # the embeddings' (B, T, C), the same on every tp rank, is cut to this rank's T / tp
        cut = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), **local)
        parallelize_module(layers[0], mesh, cut)
    if last:  # the final norm and the head see the whole sequence again
        final = sp.final_norm if m is workload.model else sp.stage_final_norm
        if final is None:
            raise ValueError(f"sequence_parallel with pp > 1 needs SequencePlan.stage_final_norm, which "
                             f"{type(workload.model).__name__}'s plan has not")
        whole = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), **local)
        parallelize_module(m.get_submodule(final), mesh, whole)


def _apply_data_parallel(m: nn.Module, layers: nn.ModuleList | None, config: TrialConfig, d: Dist) -> nn.Module:
    par = config.parallel
    if par.dp * par.fsdp == 1:
        return m
    if par.fsdp == 1 and par.tp == 1 and par.pp == 1:
        return nn.parallel.DistributedDataParallel(m, process_group=d.group("dp_replicate"))
    from torch.distributed.fsdp import fully_shard

    mesh = d.mesh["dp_replicate", "dp_shard"] if par.dp > 1 else d.mesh["dp_shard"]
    for block in layers if layers is not None else ():  # one unit per layer; without a layer list, the root only
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


def clip_grad_norm(p: Parallel, max_norm: float, d: Dist) -> torch.Tensor:
    """Clip by the global L2 norm over every rank's gradients, exactly as one process would; returns the norm.

    One reduction per device mesh for the sharded (DTensor) gradients (torch's own total norm,
    made whole once), the replicated ones added locally (they are equal on every rank),
    pipeline stages adding their squares in one more; the tied matrix counts once (its
    first-stage copy). No host sync: the norm stays a device tensor (fp16's loss scaler reads
    it, in every layout).
    """
    skip = {id(t) for t in p.tied} if p.has_last and not p.has_first else set()
    groups = _by_mesh([q for q in p.parameters() if q.grad is not None])
    sq = torch.zeros((), dtype=torch.float32, device=d.device)
    for params in groups:
        counted = [q.grad for q in params if id(q) not in skip]
        if counted:
            total = torch.nn.utils.get_total_norm(counted, norm_type=2.0, foreach=True)
            sq = sq + (total.full_tensor() if isinstance(total, DTensor) else total).float() ** 2
    if d.pp_size > 1:
        dist.all_reduce(sq, group=d.group("pp"))
    norm = sq.sqrt()
    for params in groups:  # the scale is a device tensor, clamped to 1: a small norm leaves gradients as they are
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Parameters grouped by their gradient's device mesh (plain tensors in one group of their own):
    under FSDP x TP the TP-split matrices live on (dp_shard, tp), the rest on dp_shard, and DTensor
    ops do not mix meshes."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for q in params:
        g = q.grad
        key = (g.device_mesh.mesh_dim_names, tuple(g.device_mesh.mesh.flatten().tolist())) \
            if isinstance(g, DTensor) else ()
        groups.setdefault(key, []).append(q)
    return list(groups.values())
