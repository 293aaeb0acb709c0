"""Data-parallel training under ``torchrun`` (PyTorch DDP): one process per CPU socket or GPU.

``torchrun --nproc_per_node N -m medflowad train ...`` starts N copies of the same command; each reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment (torchrun's rendezvous flags spread them over nodes).
:func:`init` joins the process group: gloo on CPU, NCCL on CUDA (one GPU per local rank).

How a step is split, so that N processes train exactly as one process on the same global batch:

- every rank draws the whole global batch of step s (indices, augmentation, dequantisation noise) from the
  generators seeded by (seed, s), as a single process would, and keeps its own contiguous 1/N of the rows
  (:func:`shard`; the outlier loss's general batch likewise). torch's ``DistributedSampler`` is not used:
  its per-rank shuffle would train on other batches than a single process, so runs would not compare;
- ActNorm's data-dependent initialisation runs on the whole first global batch on every rank before the
  model is wrapped, so all ranks start from the initialisation a single process would make;
- DDP averages the gradients of the ranks' mean losses, which is the gradient of the global mean when the
  shards have equal size (the batch size must be divisible by N); clipping, the skip of a non-finite step
  (agreed by all ranks) and the optimiser step are then identical everywhere;
- rank 0 alone writes checkpoints, the model, logs and progress; every rank resumes from the same
  checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment() -> Group:
    """The group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    return Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> Group:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on CUDA); a no-op otherwise."""
    group = from_environment()
    if group.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return group


def device_for(group: Group, device: torch.device) -> torch.device:
    """Each local rank takes its own GPU; CPU ranks share the CPU."""
    if group.active and device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def check_split(group: Group, batch_size: int) -> None:
    """Refuse a global batch the ranks cannot share equally (DDP's mean of means is the global mean only then)."""
    if batch_size % group.world:
        raise ValueError(f"a global batch of {batch_size} does not split over {group.world} processes: choose a "
                         f"batch size divisible by {group.world}")


def shard(group: Group, batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch (rows rank*n/N .. (rank+1)*n/N)."""
    if not group.active:
        return batch
    check_split(group, len(batch))
    size = len(batch) // group.world
    return batch[group.rank * size : (group.rank + 1) * size]


def all_finite(group: Group, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (all ranks must agree to skip a step together)."""
    flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=value.device)
    if group.active:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def mean_over_ranks(group: Group, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The ranks' mean of each logged value (the global batch's value for means over equal shards)."""
    if not group.active or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / group.world).tolist(), strict=True))


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()
