"""Collective helpers for data-parallel editing on Lightning's process group.

Under ``strategy: ddp`` every rank holds the same model. Work that is independent per request
(target optimization, key reads, evaluation) or per text (key statistics) is split across ranks
with a strided shard (rank ``r`` takes items ``r, r + W, r + 2W, ...``) and gathered back in the
original order, so every rank then computes the same closed-form update. Without an initialized
process group every function is the single-process identity.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_indices(n: int) -> list[int]:
    """The indices of ``n`` items this rank handles (strided)."""
    rank, world = rank_and_world()
    return list(range(rank, n, world))


def shard(items: list[T]) -> list[T]:
    return [items[i] for i in shard_indices(len(items))]


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble ``[n, ...]`` from every rank's strided shard ``local`` (``[len(shard), ...]``).

    Shards are padded to a common length for ``all_gather``; item ``i`` comes from rank
    ``i % W``, row ``i // W``.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    m = -(-n // world)
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for i in range(n):
        out[i] = parts[i % world][i // world]
    return out


def gather_objects(local: list[Any], n: int) -> list[Any]:
    """Like :func:`gather_rows` for picklable objects."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(parts, local)
    return [parts[i % world][i // world] for i in range(n)]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_main() -> bool:
    return rank_and_world()[0] == 0


def checksum(tensors: list[torch.Tensor]) -> str:
    """A digest of the exact bytes of ``tensors`` (to compare weights across ranks)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def assert_same_on_all_ranks(tensors: list[torch.Tensor], what: str) -> str:
    """Raise if the checksum of ``tensors`` differs between ranks; return it."""
    digest = checksum(tensors)
    if is_distributed():
        digests: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{what} differ across ranks: checksums {digests}")
    return digest
