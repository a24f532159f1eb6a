"""The process group and device mesh of one multi-process trial, and reductions across ranks.

The mesh is ``pp x dp_replicate x dp_shard x tp`` (torchtitan's naming), every
dimension present even when its size is 1, so the code below never branches on which
dimensions exist. A trial of world size 1 gets ``Dist.single()`` and no process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cotune.config import TrialConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class Dist:
    """Where this rank sits: its coordinates in the mesh and the groups it talks over."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    pp_rank: int = 0
    pp_size: int = 1
    dp_index: int = 0  # which slice of the global batch this rank trains on
    dp_size: int = 1  # data-parallel ranks in all: dp_replicate * dp_shard
    tp_rank: int = 0
    across_nodes: bool = False  # the ranks span machines (cotune.nodes): rank 0 may be on another one

    @property
    def reporter(self) -> bool:
        """Whether this rank writes the trial's result and rung reports (see :func:`reports`)."""
        return reports()

    def from_rank0(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it, on every rank: across machines, rank 0 may not be the one that reports
        (a collective there; elsewhere ``obj`` is returned as is)."""
        if not self.across_nodes:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @classmethod
    def single(cls, device: str) -> Dist:
        return cls(rank=0, world_size=1, device=torch.device(device), mesh=None)

    @property
    def reports_loss(self) -> bool:
        """One rank per data-parallel slice reports the loss: the last stage's first tp rank."""
        return self.pp_rank == self.pp_size - 1 and self.tp_rank == 0

    def group(self, *dims: str) -> dist.ProcessGroup | None:
        if self.mesh is None:
            return None
        sub = self.mesh[dims] if len(dims) > 1 else self.mesh[dims[0]]
        return sub._flatten().get_group() if len(dims) > 1 else sub.get_group()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over every rank (step times, peak memory)."""
        if self.mesh is None:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def loss_means(self, values: torch.Tensor) -> list[float]:
        """Element-wise mean of a (steps,) float64 tensor over the ranks that report the loss: one all-reduce."""
        weight = 1.0 if self.reports_loss else 0.0
        both = torch.stack([values * weight, torch.full_like(values, weight)])  # (2, steps)
        dist.all_reduce(both)  # every rank learns the same means, so all stop together on a NaN
        return (both[0] / both[1]).tolist()

    def loss_mean(self, value: float, weight: float = 1.0) -> float:
        """Mean of the loss over the ranks that report it (the last stage), weighted."""
        if self.mesh is None:
            return value
        mine = (value * weight, weight) if self.reports_loss else (0.0, 0.0)
        t = torch.tensor(mine, dtype=torch.float64)
        dist.all_reduce(t)  # every rank learns the same mean, so all stop together on a NaN
        return (t[0] / t[1]).item()


def init(config: TrialConfig) -> Dist:
    """Join the process group torchrun set up and build the mesh; world size 1 needs none.

    torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) is its contract with the
    worker, so it is read here, at the trial's edge.
    """
    par, run = config.parallel, config.run
    if par.world_size == 1:
        return Dist.single(run.device)
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"a trial of world_size={par.world_size} runs one process per rank under torchrun "
            "(cotune.runner launches it so), but WORLD_SIZE is not set in this process"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != par.world_size:
        raise ValueError(
            f"torchrun's WORLD_SIZE == dp * fsdp * tp * pp must hold, but got WORLD_SIZE={world}, "
            f"dp={par.dp}, fsdp={par.fsdp}, tp={par.tp}, pp={par.pp}"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if run.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # A rank stuck in a collective raises after the trial's own timeout; the runner kills
    # the tree at the same moment anyway, so nothing outlives the trial.
    dist.init_process_group(
        backend="nccl" if run.device == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=run.timeout_s),
    )
    mesh = init_device_mesh(
        run.device, (par.pp, par.dp, par.fsdp, par.tp), mesh_dim_names=MESH_DIMS
    )
    coords = {name: mesh[name].get_local_rank() for name in MESH_DIMS}
    return Dist(
        rank=dist.get_rank(),
        world_size=world,
        device=device,
        mesh=mesh,
        pp_rank=coords["pp"],
        pp_size=par.pp,
        dp_index=coords["dp_replicate"] * par.fsdp + coords["dp_shard"],
        dp_size=par.dp * par.fsdp,
        tp_rank=coords["tp"],
        across_nodes=world != int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


def reports() -> bool:
    """Whether this process writes the trial's result and rung reports: rank 0 on one machine; across
    machines, each machine's first rank (rank 0's result and reports are sent to it), so the search's
    machine has them whichever machine torchrun made rank 0."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world == os.environ.get("LOCAL_WORLD_SIZE", world):
        return int(os.environ.get("RANK", "0")) == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def shutdown(d: Dist) -> None:
    if d.mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
