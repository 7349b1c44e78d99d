"""Data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N -m specabund train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their environment. This module
reads them; without them (or with ``WORLD_SIZE=1``) every function here is a no-op and training is the
ordinary single-process one.

The process group is created on first use (:func:`context`): ``gloo`` for CPU tensors and, on a machine with
CUDA, ``nccl`` for CUDA tensors (the process then uses GPU ``LOCAL_RANK``). It is destroyed when the process
exits.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a ``torchrun`` launch (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics, plots and the saved model."""
        return self.rank == 0


_SINGLE = DistContext()


def env_context() -> DistContext:
    """The launch described by the environment variables ``torchrun`` sets (no process group needed)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        return _SINGLE
    if world <= 1:
        return _SINGLE
    return DistContext(rank=rank, world_size=world, local_rank=local, local_world_size=local_world)


def is_primary() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` launch, or not distributed at all."""
    return env_context().is_primary


def context() -> DistContext:
    """The launch, with its process group initialised (once) when it spans more than one process."""
    ctx = env_context()
    if not ctx.enabled:
        return ctx
    if not dist.is_available():
        logger.warning("torch.distributed is not available in this build: training in one process")
        return _SINGLE
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        logger.info(
            "distributed training: rank %d of %d (local rank %d), backend %s",
            ctx.rank,
            ctx.world_size,
            ctx.local_rank,
            backend,
        )
        if not ctx.is_primary:
            # one rank speaks for all: the others keep warnings and errors only
            logging.getLogger("specabund").setLevel(logging.WARNING)
    return ctx


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active():
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable; ``obj`` itself when not distributed)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_on_all_ranks(obj: T) -> T:
    """Rank 0's value of ``obj`` everywhere, initialising the process group from the environment if
    needed (for values a command computes before training, such as a time-stamped run folder)."""
    if not env_context().enabled:
        return obj
    context()
    return broadcast(obj)


__all__ = [
    "DistContext",
    "all_gather",
    "barrier",
    "broadcast",
    "context",
    "env_context",
    "is_primary",
    "same_on_all_ranks",
]
