"""The one code file Kaggle runs: an entry file of ``kernel/`` with the shared module inlined.

Kaggle pushes a kernel as ONE file (``kernels_push`` sends the text of ``code_file``; nothing beside
it goes up). ``kernel/submit.py`` and ``kernel/train.py`` share their stdlib-only bootstrap
(bundle discovery, offline install) in ``kernel/kaggle_env.py``; in each entry file the lines::

    # >>> kaggle_env ...
    sys.path.insert(0, ...)
    from kaggle_env import ...
    # <<< kaggle_env

are replaced here by the text of ``kaggle_env.py`` (less its ``from __future__`` line, which the
entry file already has at its top). Optionally the line ``STAGED: dict = {}`` is replaced by the
values a push fixes for this kernel (``push.py train``: the fold and the bundle id), since Kaggle
runs the file without arguments. The result is compiled before it is used.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cellseg.errors import CellsegError
from cellseg.kaggle.bundle import BundleFile

BEGIN = "# >>> kaggle_env"
END = "# <<< kaggle_env"
SHARED = "kaggle_env.py"
STAGED_RE = re.compile(r"^STAGED: dict = \{\}.*$", re.MULTILINE)


def stage_code(entry: str | Path, staged: dict[str, str] | None = None) -> str:
    """The text to push for ``entry``: the shared module inlined, ``STAGED`` filled in.

    Args:
        entry: ``kernel/submit.py`` or ``kernel/train.py`` (``kaggle_env.py`` is read from beside it).
            A file without the ``kaggle_env`` block is returned as it is.
        staged: values for the entry's ``STAGED: dict = {}`` line (str keys and values), or None.
    Returns:
        The self-contained source. CellsegError when the markers are malformed, ``staged`` is given
        but the entry has no ``STAGED`` line, or the result does not compile.
    """
    entry = Path(entry)
    text = entry.read_text()
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if begins or ends:
        if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
            raise CellsegError(f"{entry}: expected one '{BEGIN}' line followed by one '{END}' line")
        shared = entry.parent / SHARED
        if not shared.is_file():
            raise CellsegError(f"{shared}: not found (the kernel's shared module)")
        body = [line for line in shared.read_text().splitlines(keepends=True) if not line.startswith("from __future__")]
        block = [f"{BEGIN}: kernel/{SHARED}, inlined by push.py (Kaggle runs one file)\n", *body]
        block.append(f"{END}\n")
        lines = lines[: begins[0]] + block + lines[ends[0] + 1 :]
    out = "".join(lines)
    if staged is not None:
        if len(STAGED_RE.findall(out)) != 1:
            raise CellsegError(f"{entry}: expected one line 'STAGED: dict = {{}}' to fill in")
        literal = repr({str(k): str(v) for k, v in staged.items()})
        out = STAGED_RE.sub(lambda _: f"STAGED: dict = {literal}  # filled in by push.py", out)
    if re.search(r"^\s*(from kaggle_env import|import kaggle_env)", out, re.MULTILINE):
        raise CellsegError(f"{entry}: imports kaggle_env outside the '{BEGIN}' block")
    try:
        compile(out, str(entry), "exec")
    except SyntaxError as e:
        raise CellsegError(f"{entry}: the staged kernel does not compile ({e.msg}, line {e.lineno})") from None
    return out


def write_staged(entry: str | Path, dst: str | Path, rel: str, staged: dict[str, str] | None = None) -> BundleFile:
    """Write :func:`stage_code` of ``entry`` to ``dst``; return it as file ``rel`` with size and sha256."""
    data = stage_code(entry, staged).encode()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return BundleFile(rel, len(data), hashlib.sha256(data).hexdigest())
