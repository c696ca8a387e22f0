"""The machine a benchmark ran on, as benchmarks/README.md records it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` (``lscpu``) gives it; ``platform.processor()`` is empty
    on Linux, so it is only the fallback."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``"<CPU model>, N cores"``."""
    return f"{cpu_model()}, {os.cpu_count()} cores"
