"""torchrun support: a tiny context that is a no-op in a single process.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) it initialises the process group (NCCL on GPUs, gloo on CPU),
wraps the model in DistributedDataParallel and averages logged losses over ranks; its waits for the other ranks end
on Ctrl-C, SIGTERM and SIGHUP (`interruptible`).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as td


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # The collectives below wait for every rank: `interruptible`, so that a signal ends a rank whose peer hangs.
    def barrier(self) -> None:
        if self.world > 1:
            interruptible(td.barrier)

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
        interruptible(lambda: td.all_reduce(t, op=td.ReduceOp.SUM))
        return t / self.world

    def gather(self, obj):
        """Rank 0 gets the list of every rank's obj (in rank order); the others get None."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        interruptible(lambda: td.gather_object(obj, out, dst=0))
        return out

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items."""
        per = -(-n // self.world)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    def teardown(self) -> None:
        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()


def interruptible(fn):
    """fn()'s result, with fn run in a daemon thread while the main thread waits for it in 0.1 s slices; what fn
    raises is raised here. A native call that blocks (c10d's rendezvous: the TCPStore waits up to 30 minutes for
    peers that may never come) holds the thread it runs in, and Python runs signal handlers in the main thread
    only, between bytecodes: run there, Ctrl-C, SIGTERM and SIGHUP did nothing until it returned. The thread blocks
    those signals, so that the kernel delivers them to the main thread (an interrupted connect in the store's
    client would be retried with a warning). Outside the main thread: fn() as it is."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    from ..errors import SIGNAL_WORDS

    box: dict = {}

    def run():
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNAL_WORDS))
        try:
            box["value"] = fn()
        except BaseException as e:   # raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="ddpm-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in box:
        raise box["error"]
    return box.get("value")


# What gloo's and NCCL's errors say when a peer process died or its connection broke (torch raises them as
# RuntimeError, or its subclass DistBackendError)
_PEER_TEXTS = ("connection reset by peer", "connection closed by peer", "broken pipe", "gloo/transport",
               "nccl error", "ncclremoteerror", "socket timeout")


def peer_failure(e: BaseException) -> bool:
    """Whether `e`, raised by a collective (DDP's gradient all-reduce, a barrier), says that another rank of the job
    stopped or its connection broke."""
    dist_error = getattr(td, "DistBackendError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or any(t in str(e).lower() for t in _PEER_TEXTS)


def setup(device: str = "auto") -> DistContext:
    """This process's DistContext: one process unless torchrun's variables (launch.launch, checked: LaunchError
    otherwise) say more; then the process group is initialised (NCCL on GPUs, gloo on the CPU), a wait for the
    peers that Ctrl-C, SIGTERM and SIGHUP interrupt (`interruptible`)."""
    from ..launch import launch

    where = launch()
    world, rank, local = where.world, where.rank, where.local
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        interruptible(lambda: td.init_process_group("nccl" if use_cuda else "gloo"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(rank, world, local, dev)
