"""torch.distributed for training: the process group torchrun describes, and the few collectives the
loop needs (loss means, BatchNorm buffers, RNG states, and rank 0's "done" after its validation).

On GPUs the group is NCCL, which has no CPU backend: every tensor a collective gets here is on the
rank's training device (:attr:`DistInfo.device`). The ranks that wait while rank 0 validates and
writes the run folder wait on a separate gloo group (CPU, long timeout, and a dead peer's closed
socket is noticed at once), and rank 0 tells them whether it succeeded: a rank 0 that raises there
(:func:`main_section`) makes every other rank stop with one clear line instead of hanging in an NCCL
barrier until NCCL's timeout.

:func:`process_group` owns the group's lifetime: a process whose group is still alive when Python
exits can die with SIGABRT ("terminate called without an active exception": gloo's worker threads
still hold work objects while Python tears down), which turns a clean exit status into a signal
(pytorch/pytorch#190489). ``destroy_process_group`` alone is not enough: the DDP wrapper's reducer
holds the group too, and the wrapper sits in reference cycles (or in the frames of a failed run's
traceback), so it is freed only at exit unless it is collected first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cellseg.errors import CellsegError
from cellseg.training.rng import rng_state

#: how long the other ranks wait for rank 0's validation + checkpoint writes (gloo group)
MAIN_SECTION_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # the training device: this rank's GPU, else the CPU
    control: Any = field(default=None, compare=False, repr=False)  # gloo group for rank 0's "done"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK...).

    With CUDA: an NCCL group on this rank's GPU, plus a gloo group for the waits in
    :func:`main_section`; on the CPU: one gloo group for both.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=_default_device(0))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _default_device(local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", init_method="env://")
        else:
            dist.init_process_group(backend="gloo", init_method="env://", timeout=MAIN_SECTION_TIMEOUT)
    control = None
    if dist.get_backend() != "gloo":
        control = dist.new_group(backend="gloo", timeout=MAIN_SECTION_TIMEOUT)
    return DistInfo(rank, world, local, device, control)


@contextlib.contextmanager
def process_group() -> Iterator[DistInfo]:
    """:func:`init_distributed` for the duration of a ``with`` block, then the groups it created are
    destroyed (a group the caller initialised before stays the caller's).

    On the way out after an exception an NCCL group is left as it is: a graceful NCCL shutdown waits
    for this rank's pending collectives, which a failed peer may never join (``torchrun`` stops the
    survivors); its gloo control group is still destroyed. gloo groups are always destroyed: that is
    local, and it is what keeps a failing rank's exit code from being replaced by SIGABRT at
    interpreter exit. Before that, the DDP wrapper is collected (after a failure, the locals of the
    traceback's finished frames are cleared first: they hold it), so nothing holds the group any more.

    Yields:
        this process's :class:`DistInfo`.
    """
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    info = init_distributed()
    ok = False
    try:
        yield info
        ok = True
    except BaseException as e:
        if created:  # the failed run's finished frames hold its DDP wrapper: drop their locals
            traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if created and dist.is_initialized():
            gc.collect()  # free the DDP wrapper (reference cycles) and with it its hold on the group
            if ok or dist.get_backend() == "gloo":
                dist.destroy_process_group()
            elif info.control is not None:
                dist.destroy_process_group(info.control)


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def gather_rng(info: DistInfo) -> list[dict]:
    """Every rank's generator states (rank order), for a resume that continues each rank exactly.

    The states travel pickled over the control (gloo) group when there is one, else the default group
    (gloo too: on NCCL ``all_gather_object`` would need the current CUDA device set, which it is)."""
    state = rng_state()
    if not info.distributed:
        return [state]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state, group=info.control)
    return states


def reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over ranks of each value (identity in a single process); the all-reduce runs on the
    training device (NCCL has no CPU tensors)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.cpu().tolist())}


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running stats drift apart per rank) on every rank, in place."""
    if not info.distributed:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


# ----------------------------------------------------------------------------- rank 0's section

_open: list[DistInfo] = []  # rank 0 only: a main section is open (the other ranks wait in main_done)


def main_section(info: DistInfo) -> None:
    """Mark the start of the part only rank 0 runs (validation, checkpoints); end it with
    :func:`main_done`. If rank 0 raises in between, :func:`fail_fast` tells the waiting ranks."""
    if info.distributed and info.main:
        _open[:] = [info]


def main_done(info: DistInfo) -> None:
    """End of rank 0's section: rank 0 tells every rank it succeeded; the others wait for that here
    (on the gloo group) and raise CellsegError if rank 0 reports a failure."""
    if not info.distributed:
        return
    _open.clear()
    _exchange(info, None)


def _exchange(info: DistInfo, error: str | None) -> None:
    msg = [error]
    try:
        dist.broadcast_object_list(msg, src=0, group=info.control)
    except Exception as e:  # e.g. rank 0's process died: its socket closed
        if info.main:
            raise
        raise CellsegError(f"rank {info.rank}: lost rank 0 while it validated ({_first_line(e)}); stopping") from e
    if msg[0] is not None and not info.main:
        raise CellsegError(f"rank {info.rank}: rank 0 failed while validating / writing the run ({msg[0]}); stopping")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


F = TypeVar("F", bound=Callable[..., Any])


def fail_fast(fn: F) -> F:
    """Decorator for the training run: when rank 0 raises inside an open :func:`main_section`, send
    the error to the waiting ranks before it propagates, so they stop at once."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if _open:
                info = _open.pop()
                try:
                    _exchange(info, _first_line(e))
                except Exception:  # the others are gone already: nothing more to tell
                    pass
            raise

    return wrapper  # type: ignore[return-value]
