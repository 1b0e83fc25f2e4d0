"""torchrun support: a tiny context that is a no-op in a single process.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) it initialises the process group (NCCL on GPUs, gloo on CPU),
wraps the model in DistributedDataParallel and averages logged losses over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as td


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t / self.world

    def gather(self, obj):
        """Rank 0 gets the list of every rank's obj (in rank order); the others get None."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        td.gather_object(obj, out, dst=0)
        return out

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items."""
        per = -(-n // self.world)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    def teardown(self) -> None:
        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()


def setup(device: str = "auto") -> DistContext:
    """This process's DistContext: one process unless torchrun's variables (launch.launch, checked: LaunchError
    otherwise) say more; then the process group is initialised (NCCL on GPUs, gloo on the CPU)."""
    from ..launch import launch

    where = launch()
    world, rank, local = where.world, where.rank, where.local
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        td.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(rank, world, local, dev)
