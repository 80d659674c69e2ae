"""Calibration spread over ``torch.distributed`` ranks (gloo on CPU, NCCL on GPUs).

Every rank runs the same pass on the same model. ``LayerwiseRunner`` gives rank ``r`` the
calibration batches ``r, r + world, ...``; the statistics a layer's solve needs are summed over
the ranks (``all_reduce_sum``: ``HessianAccumulator.value`` calls it); the solves themselves
(one per group of linears that share an input) are divided round-robin between the ranks and
their results broadcast (``share``), so every rank installs the same weights and advances its
own batches through the same layer.

The Hessians are float64 sums of float32 per-batch products, so a different grouping of the
batches changes nothing in practice (a float64 sum of float32 values is exact unless their
magnitudes span more than 2^29): the result equals the single-process one bit for bit when each
rank computes with the single process's number of threads (a float32 GEMM's reduction order
depends on it; tested). ``--nproc`` splits the cores between the ranks by default, which is
faster and leaves about 0.01 % of the int4 codes one step apart (rounding at ties; tested to
stay under 0.1 %).

Outside an initialized process group every function here is the single-process identity.
"""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from typing import Any, Callable, TypeVar

import torch

from modelfold.errors import OptionError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes the outputs (rank 0)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def my_batches(batches: list[Any]) -> list[Any]:
    """This rank's share of the calibration batches (all of them in one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return batches
    if len(batches) < world:
        raise OptionError(f"{len(batches)} calibration batch(es) cannot feed {world} ranks; use "
                          "more samples (n_samples) or a smaller batch_size, or fewer ranks")
    return batches[rank::world]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def share(index: int, compute: Callable[[], T]) -> T:
    """Solve ``index`` of a layer: computed by rank ``index % world``, broadcast to the others.

    ``compute`` returns a dataclass whose fields are tensors, numbers or None; the other ranks
    get an equal instance (tensors by ``broadcast``, the rest through a JSON header).
    """
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    import torch.distributed as dist

    owner = index % world
    if rank == owner:
        result = compute()
        if not is_dataclass(result):
            raise TypeError("share: compute must return a dataclass")
        header = {"class": type(result).__name__, "fields": []}
        tensors = []
        for f in fields(result):
            value = getattr(result, f.name)
            if isinstance(value, torch.Tensor):
                header["fields"].append({"name": f.name, "dtype": str(value.dtype).removeprefix(
                    "torch."), "shape": list(value.shape)})
                tensors.append(value.contiguous())
            else:
                header["fields"].append({"name": f.name, "value": value})
        raw = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
        length = torch.tensor([raw.numel()], dtype=torch.int64)
        dist.broadcast(length, src=owner)
        dist.broadcast(raw, src=owner)
        for t in tensors:
            dist.broadcast(t, src=owner)
        return result
    length = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(length, src=owner)
    raw = torch.zeros(int(length), dtype=torch.uint8)
    dist.broadcast(raw, src=owner)
    header = json.loads(bytes(raw.tolist()).decode())
    values: dict[str, Any] = {}
    for entry in header["fields"]:
        if "dtype" in entry:
            t = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
            dist.broadcast(t, src=owner)
            values[entry["name"]] = t
        else:
            values[entry["name"]] = entry["value"]
    return _Shared(header["class"], values)  # type: ignore[return-value]


class _Shared:
    """The broadcast fields of a dataclass result, read as attributes."""

    def __init__(self, cls: str, values: dict[str, Any]):
        self._cls = cls
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"<{self._cls} from another rank>"


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` (or ``--nproc``) describes in the environment
    (``WORLD_SIZE`` > 1); gloo on CPU, NCCL where CUDA is present. Returns whether it joined."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


__all__ = ["all_reduce_sum", "barrier", "init_from_env", "is_main", "my_batches",
           "rank_and_world", "share"]
