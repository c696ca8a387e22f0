"""Shared checks for the bad-input matrix (docs/BAD_INPUT.md): run the real CLI, then assert the exit
status, that no traceback appeared, that exactly one error line names the problem, and that nothing
half-written was left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cellseg
from cellseg.cli import main

#: the ``src`` folder of the cellseg under test (a worktree's, not the venv's editable install)
SRC = Path(cellseg.__file__).resolve().parents[1]
REPO = SRC.parent


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the cellseg under test first on PYTHONPATH and one thread."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def cli(*args: object, cwd: Path, timeout: float = 300, prefix: tuple[str, ...] = ()) -> Result:
    """``python -m cellseg ARGS`` in a real subprocess (``prefix`` goes before the interpreter)."""
    cmd = [*prefix, sys.executable, "-m", "cellseg", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=child_env(), timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def cli_inproc(capsys: pytest.CaptureFixture, *args: object) -> Result:
    """``cellseg ARGS`` through :func:`cellseg.cli.main` in this process (torch already imported: fast).
    argparse's exit becomes the status; any other exception escapes and fails the test, as a
    traceback would."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def assert_one_line_error(res: Result, *words: str, code: int = 2, prefix: str = "cellseg ") -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line on stderr, containing every word."""
    assert res.code == code, f"exit {res.code}, expected {code}\n{res.err[-3000:]}"
    assert "Traceback" not in res.text, res.text[-3000:]
    lines = [ln for ln in res.err.splitlines() if ln.startswith(prefix) and ": error: " in ln]
    assert len(lines) == 1, res.err[-3000:]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` (dotfiles too: atomic writes' temporaries would show here)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def read_only_mount_prefix(mountpoint: Path) -> tuple[str, ...] | None:
    """A command prefix that runs the rest with a read-only tmpfs mounted on ``mountpoint`` (a user
    + mount namespace: no privileges needed where unprivileged namespaces are allowed), or None when
    this machine does not allow it. Root ignores permissions, so this is how a real read-only
    filesystem is tested."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o ro tmpfs "{mountpoint}" && exec "$@"'
    prefix = ("unshare", "-rm", "sh", "-c", script, "sh")
    try:
        probe = subprocess.run([*prefix, "touch", str(mountpoint / "x")], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        (mountpoint / "x").unlink(missing_ok=True)
        return None
    return prefix


def grey_picture(seed: int = 0, h: int = 24, w: int = 32) -> np.ndarray:
    """(H, W) uint8 that uses most grey levels (a ramp plus noise), so palette/scale mistakes show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :] + rng.normal(0, 20, (h, w))
    return np.clip(ramp, 0, 255).astype(np.uint8)


def save_as(grey: np.ndarray, mode: str, path: Path, seed: int = 0) -> Path:
    """Save the same picture as PNG mode L, LA, P (shuffled palette), RGB, RGBA or I;16 (low-byte noise)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        im = Image.fromarray(grey, "L")
    elif mode == "LA":
        alpha = rng.integers(0, 256, grey.shape, dtype=np.uint8)  # alpha must not leak into the grey
        im = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    elif mode in ("RGB", "RGBA"):
        chans = [grey] * 3 + ([rng.integers(0, 256, grey.shape, dtype=np.uint8)] if mode == "RGBA" else [])
        im = Image.fromarray(np.stack(chans, -1), mode)
    elif mode == "P":
        # palette index k shows grey perm[k]: indices are far from the grey values they stand for
        perm = rng.permutation(256).astype(np.uint8)
        inverse = np.argsort(perm).astype(np.uint8)
        im = Image.fromarray(inverse[grey], "P")
        im.putpalette(np.repeat(perm, 3).tolist())
    elif mode == "I;16":
        wide = grey.astype(np.int32) * 257 + rng.integers(-128, 129, grey.shape)  # rounds back to grey
        im = Image.fromarray(np.clip(wide, 0, 65535).astype(np.uint16))
    else:
        raise ValueError(mode)
    im.save(path, format="PNG")
    return path


def usage_error(res: Result, *words: str) -> str:
    """argparse's one-line usage error: exit 2, no traceback, an ``error:`` line with every word."""
    assert res.code == 2, f"exit {res.code}\n{res.err[-3000:]}"
    assert "Traceback" not in res.text, res.text[-3000:]
    (line,) = [ln for ln in res.err.splitlines() if ": error: " in ln]
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def full_disk_prefix(mountpoint: Path, keep: Path | None = None) -> tuple[str, ...] | None:
    """A command prefix that runs the rest with a full 64 KiB tmpfs on ``mountpoint`` (a user + mount
    namespace, as :func:`read_only_mount_prefix`): ``keep`` (a file) is first copied into it as
    ``earlier``, the rest filled with zeros; after the command its sha256 and the folder's names are
    printed on stdout after a ``--- after`` line. None where the machine does not allow it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    copy = f'cp "{keep}" "{mountpoint}/earlier" && ' if keep else ""
    script = (
        f'mount -t tmpfs -o size=64k tmpfs "{mountpoint}" && {copy}'
        f'(dd if=/dev/zero of="{mountpoint}/.fill" bs=4k >/dev/null 2>&1; true) && '
        f'"$@"; rc=$?; echo "--- after"; sha256sum "{mountpoint}"/earlier 2>/dev/null; ls -A "{mountpoint}"; exit $rc'
    )
    prefix = ("unshare", "-rm", "sh", "-c", script, "sh")
    try:
        probe = subprocess.run(
            [*prefix, "dd", "if=/dev/zero", f"of={mountpoint}/y", "bs=1k", "count=8"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode == 0 or "No space left" not in probe.stderr:
        return None
    return prefix
