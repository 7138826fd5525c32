"""torchrun-based distribution: NCCL on GPUs, gloo on CPU; a single process when no torchrun environment is set."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Initialise the process group from torchrun's environment (if any) and return this rank's device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(backend=backend, store=_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)  # fmt: skip
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _store(rank: int, world: int, timeout) -> dist.Store:
    """The rendezvous store of env:// (MASTER_ADDR, MASTER_PORT), with the keys of each torchrun attempt under their
    own prefix: after `torchrun --max-restarts` restarts a job, the killed attempt's keys (a dead rank's address) may
    still be in the agent's store, and a restarted rank that read one would connect to nobody."""
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not use_agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not use_agent_store,
    )
    return dist.PrefixStore(f"sid_fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max_flag(flag: bool, device) -> bool:
    """True on every rank if any rank's flag is True (used so that all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned as a new tensor (the input is left unchanged)."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (a collective when distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def finish() -> None:
    """All ranks leave together: a rank that exits while others still use gloo/NCCL can abort them."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
