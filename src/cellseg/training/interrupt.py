"""Ctrl-C during training that is never lost.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode the main thread runs next. When that
is inside a ``__del__`` (a DataLoader iterator shutting its workers down at the end of every epoch),
a weakref callback or a garbage-collector run, Python prints "Exception ignored" and drops it: the run
trains on and exits 0. :func:`interrupt_guard` records every SIGINT in a flag that nothing can drop;
the training loop calls :func:`raise_if_interrupted` at its step and epoch boundaries (and writes an
epoch's checkpoint and metrics inside :func:`deferred_interrupts`, so they never disagree), and the guard
raises KeyboardInterrupt on the way out when an interrupt was recorded, so the command ends with 130
whatever the interrupt hit. The run folder holds the last completed epoch (atomic writes), which
``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_received: list[int] = []  # one entry per SIGINT received inside interrupt_guard
_deferring: list[bool] = []  # non-empty inside deferred_interrupts()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if not _deferring:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A block that a SIGINT does not cut short (inside :func:`interrupt_guard`): it is recorded, and
    raised as KeyboardInterrupt when the block ends. For writes that belong together (``last.pth``
    and ``metrics.csv`` of one epoch)."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    raise_if_interrupted()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt when a SIGINT arrived inside :func:`interrupt_guard`, even one whose
    KeyboardInterrupt was raised somewhere Python dropped it."""
    if _received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Record SIGINT for the duration of a ``with`` block (main thread, default SIGINT handler only:
    a handler someone else installed, or SIGINT ignored as in a background job, is left alone).

    The first SIGINT still raises KeyboardInterrupt at once. Leaving the block after an interrupt always
    raises KeyboardInterrupt: also when the block ends normally (the interrupt was dropped) or with
    another exception (e.g. a DataLoader worker that the same Ctrl-C stopped).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _received.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
        raise_if_interrupted()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if _received:
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _received.clear()
