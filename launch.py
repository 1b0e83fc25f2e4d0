"""The torchrun environment, read and checked in one place.

torchrun (torch.distributed.run) starts each process of a job with WORLD_SIZE (the number of processes), RANK (this
one's index), LOCAL_RANK (its index on this machine) and MASTER_ADDR / MASTER_PORT (where the processes meet: the
env:// rendezvous of torch.distributed.init_process_group). A command runs as one process unless WORLD_SIZE says
more than one; then every one of them must be there and hold what torchrun writes, or the command stops in one line
naming the variable before any work (a hand-set WORLD_SIZE=abc, or WORLD_SIZE=2 without RANK, raised Python's
ValueError or KeyError from deep inside a command, and torch.distributed's own error for a missing MASTER_ADDR).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DdpmError, brief


class LaunchError(DdpmError):
    """The torchrun variables of the environment do not describe a job this process can join."""


@dataclass(frozen=True)
class Launch:
    """This process's place in its job: world processes in all, this one rank (local: its index on this machine)."""

    world: int = 1
    rank: int = 0
    local: int = 0


def _integer(name: str, value: str, lo: int, hi: int | None, why: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= (hi if hi is not None else int(text)):
        span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise LaunchError(f"${name} is {brief(value)}, not a whole number {span} ({why}); torchrun sets it: start "
                          f"the command with torchrun, or unset $WORLD_SIZE to run one process")
    return int(text)


def launch() -> Launch:
    """This process's Launch: one process (Launch()) when WORLD_SIZE is unset or 1 (RANK and the others are then
    ignored); under torchrun (WORLD_SIZE > 1) RANK in 0..WORLD_SIZE-1, LOCAL_RANK (default 0) and MASTER_ADDR,
    MASTER_PORT (1..65535) as torchrun sets them. Raises LaunchError naming the first variable that does not fit."""
    env = os.environ
    world = _integer("WORLD_SIZE", env.get("WORLD_SIZE", "1"), 1, None, "the number of processes of the job")
    if world == 1:
        return Launch()
    if "RANK" not in env:
        raise LaunchError(f"$WORLD_SIZE is {world} but $RANK is not set: torchrun sets both; unset $WORLD_SIZE to "
                          f"run one process, or start the command with torchrun")
    rank = _integer("RANK", env["RANK"], 0, world - 1, f"this process's index among the job's {world}")
    local = _integer("LOCAL_RANK", env.get("LOCAL_RANK", "0"), 0, world - 1, "this process's index on this machine")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise LaunchError(f"$WORLD_SIZE is {world} but ${name} is not set: the processes of a torchrun job meet "
                              f"there (torchrun sets it); unset $WORLD_SIZE to run one process, or start the command "
                              f"with torchrun")
    _integer("MASTER_PORT", env["MASTER_PORT"], 1, 65535, "the port where the job's processes meet")
    return Launch(world, rank, local)
