"""Seeding and the generator states a resumed run restores (python, numpy, torch CPU and CUDA)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch (CPU, and one CUDA state per visible device) generator states, as
    weights_only-loadable values."""
    mt19937 = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = mt19937
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_cuda_states(
    saved: Sequence[torch.Tensor], available: int, set_state: Callable[[torch.Tensor, int], None]
) -> str | None:
    """Give each present CUDA device its saved generator state, as far as both lists go.

    A run saved on a machine with more (or fewer) GPUs than this one resumes: devices without a saved
    state keep the state seeding gave them, saved states without a device are dropped.

    Args:
        saved: the states of ``torch.cuda.get_rng_state_all()`` where the run was saved (device order).
        available: CUDA devices present here (``torch.cuda.device_count()``; 0 without CUDA).
        set_state: ``set_state(state, device_index)`` (``torch.cuda.set_rng_state``).
    Returns:
        None when the counts match, else one warning line (the continuation is then not bit-exact).
    """
    n = min(len(saved), available)
    for index in range(n):
        set_state(saved[index], index)
    if len(saved) == available:
        return None
    return (
        f"CUDA generator states saved for {len(saved)} device(s), {available} here: restored {n}; "
        "the continuation is not bit-exact"
    )


def set_rng_state(state: dict) -> str | None:
    """Restore :func:`rng_state`'s states. Returns a warning line when the saved CUDA states do not
    match this machine's devices (see :func:`restore_cuda_states`), else None."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    saved = state.get("cuda", [])
    if not saved and not available:
        return None
    return restore_cuda_states(saved, available, lambda s, i: torch.cuda.set_rng_state(s, device=i))
