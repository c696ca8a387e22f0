"""Test-only: run ``kernel/submit.py`` once per injected fault, in one real process (torch imports once).

    python inject_fault.py OUT_DIR MODULE:FUNCTION=EXCEPTION ... -- KERNEL ARGS...

For each fault: FUNCTION on MODULE (``kaggle_env`` is imported from kernel/; ``Class.method`` patches
a method on a class of MODULE) is replaced by a
function raising EXCEPTION (a builtin exception name) with the message "injected fault", the kernel
runs as ``__main__`` with ``--out OUT_DIR/<k>/submission.csv``, and the original is put back. Before
each run a line ``=== fault K MODULE:FUNCTION`` and after it ``=== exit K CODE`` go to stderr. The
kernel binds some names with ``from x import y``: patch the module that *uses* the name
(``cellseg.inference.ensemble:load_ensemble``).
"""

from __future__ import annotations

import builtins
import importlib
import runpy
import sys
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[2] / "kernel" / "submit.py"


def run_with_fault(k: int, spec: str, out_dir: Path, kernel_args: list[str]) -> None:
    target, exc_name = spec.split("=")
    module_name, path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, func = path.split(".")
    for name in parents:  # ``Class.method``: patch the attribute on the class
        owner = getattr(owner, name)
    module = owner
    exc = getattr(builtins, exc_name)
    original = getattr(module, func)  # a typo in a test must fail, not patch nothing

    def boom(*args, **kwargs):
        raise exc("injected fault")

    setattr(module, func, boom)
    print(f"=== fault {k} {target}", file=sys.stderr, flush=True)
    sys.argv = [str(KERNEL), *kernel_args, "--out", str(out_dir / str(k) / "submission.csv")]
    try:
        runpy.run_path(str(KERNEL), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        setattr(module, func, original)
    print(f"=== exit {k} {code}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    out_dir, *specs = sys.argv[1:sep]
    sys.path.insert(0, str(KERNEL.parent))
    for k, spec in enumerate(specs):
        run_with_fault(k, spec, Path(out_dir), sys.argv[sep + 1 :])
