"""torch.distributed from torchrun's environment: gloo on CPU, nccl on CUDA; rank 0 writes, metrics are all-reduced.

``torchrun --nproc_per_node N -m adavit train ...`` (multi-node: add ``--nnodes``/``--rdzv-endpoint``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``adavit train`` runs as a world of one with no process group.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Where this process stands in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0


def init_distributed(device: str = 'auto') -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    use_cuda = torch.cuda.is_available() if device == 'auto' else device.startswith('cuda')
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device('cuda', local_rank)
    else:
        torch_device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo', timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world_size, local_rank, torch_device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (sums, not means, so that unequal shards weigh by their size)."""
    if not env.distributed:
        return values
    values = values.to(env.device, torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (e.g. their RNG states, for a checkpoint rank 0 writes)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
