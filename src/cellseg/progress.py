"""Progress for long loops: a tqdm bar on a terminal, plain lines when stderr is a file or a pipe.

tqdm hides itself when stderr is not a terminal (``disable=None``), so a run whose output goes to a
log file would show nothing for minutes. :func:`progress` returns a tqdm bar on a terminal and a
:class:`PlainProgress` otherwise, which writes one line (count, rate, ETA, postfix) on the first
update, then every ``every`` items or ``seconds`` seconds, whichever comes first, and on close::

    bar = progress(total=len(ids), desc="predict-raw", unit="img", every=10)
    for image_id in ids:
        ...
        bar.update()
    bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class PlainProgress:
    """The part of tqdm's interface the loops use (update, set_postfix, close), as plain lines.

    Args:
        total: items expected (the ETA uses it).
        desc: what is counted, e.g. ``"epoch 1/3"``.
        unit: item name, e.g. ``"step"``.
        every: write a line every ``every`` items (None: by time only).
        seconds: write a line when this many seconds passed since the last one.
        file: where lines go (default stderr).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        every: int | None = None,
        seconds: float = 30.0,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.every, self.seconds = every, seconds
        self.file = file or sys.stderr
        self.n = 0
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.written_at = -1

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> str:
        """``epoch 1/3: 20/243 step (8%), 31.2 s/step, 1h55m left loss=1.234``."""
        elapsed = time.monotonic() - self.t0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}"
        if self.n:
            per = elapsed / self.n
            rate = f"{per:.1f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s"
            left = max(self.total - self.n, 0) * per
            text += f", {rate}, {_duration(elapsed)} elapsed, {_duration(left)} left"
        return text + (f" {self.postfix}" if self.postfix else "")

    def write(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last, self.written_at = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        due = self.written_at < 0 or time.monotonic() - self.last >= self.seconds
        if self.every and self.n % self.every == 0:
            due = True
        if due:
            self.write()

    def close(self) -> None:
        if self.n and self.written_at != self.n:
            self.write()


def progress(
    total: int,
    desc: str,
    unit: str,
    enabled: bool = True,
    every: int | None = None,
    seconds: float = 30.0,
    leave: bool = True,
) -> tqdm | PlainProgress:
    """A tqdm bar when ``enabled`` and stderr is a terminal; :class:`PlainProgress` lines when enabled
    and stderr is not one; a disabled tqdm (no output) otherwise.

    Args:
        total: items the loop will do (only those still to do, so the ETA is right).
        desc, unit: label and item name.
        enabled: False silences it (``--quiet``).
        every, seconds: plain-line cadence (see :class:`PlainProgress`).
        leave: keep the tqdm bar on screen when done.
    """
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, unit, every=every, seconds=seconds)
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not enabled, dynamic_ncols=True)
