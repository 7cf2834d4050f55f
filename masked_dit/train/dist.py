"""Process-group setup: single process, or torchrun (RANK / LOCAL_RANK / WORLD_SIZE).

NCCL on CUDA, gloo on CPU. ``World`` carries what the rest of the trainer needs to know.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto") -> World:
    """Reads torchrun's environment; initialises the process group when WORLD_SIZE > 1."""
    size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        # A stray RANK=1 left in a shell made rank 1 of a world of 1: it wrote nothing and exited 0.
        raise ValueError(f"the environment says RANK={rank} of WORLD_SIZE={size}: RANK must be in [0, WORLD_SIZE) "
                         "(unset RANK and WORLD_SIZE for one process, or launch with torchrun)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    here = False
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 and "MASTER_ADDR" in os.environ:
            kwargs.update(store=_attempt_store(restart, rank), rank=rank, world_size=size)
        try:
            dist.init_process_group(backend, **kwargs)
        except TypeError:  # torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(backend, **kwargs)
        here = True
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank=rank, local_rank=local_rank, size=size, device=dev, initialized_here=here)


def env_int(name: str, default: int) -> int:
    """torchrun's integer variable ``name`` (``default`` when unset), or a ValueError naming it."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _attempt_store(restart: int, rank: int):
    """The rendezvous store under a per-attempt prefix. torchrun keeps one store across restarts and
    the failed attempt's process-group keys (peer addresses) are still in it, so without a fresh
    prefix a rank that starts first dials its dead peer's old port and fails."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=rank == 0 and not agent_store)
    return dist.PrefixStore(f"masked_dit/attempt_{restart}", store)


def is_other_rank() -> bool:
    """Whether this process is a torchrun rank other than 0 (which leaves one-per-run messages to rank 0)."""
    return env_int("WORLD_SIZE", 1) > 1 and env_int("RANK", 0) != 0


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(values: dict, world: World) -> dict:
    """Averages a dict of Python floats over ranks (one collective)."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: v / world.size for k, v in zip(keys, t.tolist())}


def shutdown(world: World) -> None:
    if world.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
