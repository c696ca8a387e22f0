"""Network steps shared by ``push.py dataset/kernel/submit`` (:mod:`cellseg.kaggle.push`) and
``push.py train/fetch`` (:mod:`cellseg.kaggle.push_train`): a dataset version, a kernel push, polling
a pinned kernel version, the tail of a kernel's log."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from cellseg.kaggle import bundle as bundle_mod
from cellseg.kaggle.client import Kaggle, PushError, RemoteError, describe, http_status, say, warn


def upload_names(b: bundle_mod.Bundle) -> list[str]:
    """What the client sends for a bundle folder with dir_mode='zip': top-level files as they are,
    each sub-folder as one <name>.zip (Kaggle unpacks it)."""
    names = set()
    for f in b.files:
        top = f.path.split("/")[0]
        names.add(top if top == f.path else f"{top}.zip (folder {top}/)")
    return sorted(names)


def step_dataset(k: Kaggle, b: bundle_mod.Bundle, notes: str, wait: bool) -> None:
    api, ref, folder = k.api, b.metadata["id"], str(b.root)
    resume_hint = (
        "run the same command again (finished uploads resume); no dataset version was created, "
        "so nothing is half-done on Kaggle"
    )

    def create() -> Any:
        say(f"dataset {ref}: creating it (private)")
        return k.call(
            "dataset create",
            api.dataset_create_new,
            folder,
            public=False,
            quiet=False,
            dir_mode="zip",
            hint=resume_hint,
        )

    def version() -> Any:
        say(f"dataset {ref}: new version ({notes!r})")
        return k.retrying("dataset version", api.dataset_create_version, folder, notes, quiet=False, dir_mode="zip")

    state = k.dataset_state(ref)
    if state is None:
        resp = create()
    else:
        if state != "ready":
            # Versioning while the previous version still processes is answered with 403.
            say(f"dataset {ref}: previous version is '{state}'; waiting until it is ready before versioning")
            k.wait_dataset(ref, accept_failed=True)
        try:
            resp = version()
        except PushError:
            raise
        except Exception as e:
            code = http_status(e)
            if code == 404:
                say(f"dataset {ref}: Kaggle says it does not exist ({describe(e)}); creating it instead")
                resp = create()
            elif code == 403:
                say(f"dataset {ref}: {describe(e)}; waiting for the previous version to finish, then trying once more")
                k.wait_dataset(ref, accept_failed=True)
                resp = k.call(
                    "dataset version",
                    version,
                    hint=(
                        f"you must own {ref} (is --username right?) and no other version may be processing; "
                        f"see https://www.kaggle.com/datasets/{ref}"
                    ),
                )
            elif isinstance(e, ValueError):
                raise RemoteError(f"dataset version: {e}", resume_hint) from None
            else:
                raise RemoteError(f"dataset version: {describe(e)}", resume_hint) from None
    error = getattr(resp, "error", None)
    if error:
        raise RemoteError(f"dataset {ref}: Kaggle answered: {error}", "fix what it says, then push the dataset again")
    say(f"dataset {ref}: uploaded ({getattr(resp, 'url', '') or 'https://www.kaggle.com/datasets/' + ref})")
    if wait:
        k.wait_dataset(ref)


def pinned(ref: str, version: int | None) -> str:
    """``owner/slug/VERSION`` (the client's form for one version), or ``ref`` when no version is known."""
    return f"{ref}/{version}" if version else ref


def kernel_status(k: Kaggle, ref: str, version: int) -> Any:
    """The status of version ``version`` of kernel ``ref``. Always pinned: right after a push, the
    unversioned status can still be the previous version's COMPLETE."""
    return k.call("kernel status", k.api.kernels_status, pinned(ref, version))


def output_file(k: Kaggle, ref: str, version: int | None, name: str, folder: Path) -> Path | None:
    """Download only ``name`` from the output of ``ref`` (version ``version``, else the latest) into
    ``folder``; its path, or None when that output holds no such file."""
    pattern = "^" + re.escape(name) + "$"
    k.call("kernel output", k.api.kernels_output, pinned(ref, version), str(folder), file_pattern=pattern,
           force=True, quiet=True)  # fmt: skip
    path = folder / name
    return path if path.is_file() else None


def kernel_log_tail(k: Kaggle, ref: str, lines: int = 40, version: int | None = None) -> str:
    """The last ``lines`` lines of the log of kernel ``ref`` (version ``version``, else the latest;
    Kaggle's JSON log flattened), or '' if unavailable. Only the log comes down: a training kernel's
    output holds checkpoints of hundreds of MB."""
    with tempfile.TemporaryDirectory(prefix="cellseg-kernel-log-") as tmp:
        try:  # a file pattern no output name matches: the client then writes only the log
            files, _ = k.retrying(
                "kernel log", k.api.kernels_output, pinned(ref, version), tmp, file_pattern="^$", quiet=True
            )
        except Exception as e:  # the log is a courtesy; the ERROR itself is reported anyway
            warn(f"could not fetch the log of {ref}: {describe(e)}")
            return ""
        logs = [Path(f) for f in files if str(f).endswith(".log")]
        if not logs:
            return ""
        text = logs[0].read_text(errors="replace")
    try:
        events = json.loads(text)
        text = "".join(ev.get("data", "") for ev in events if isinstance(ev, dict))
    except ValueError:
        pass
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def push_staged_kernel(
    k: Kaggle, folder: Path, ref: str, *, hint: str, rejected_hint: str, answered_hint: str = ""
) -> Any:
    """Push the kernel staged in ``folder`` (entry file + kernel-metadata.json) and check Kaggle's answer.
    Used by ``push.py kernel`` and by ``push.py train`` (once per fold); each stages its own folder.

    Args:
        k: the client.
        folder: the staged kernel folder.
        ref: the kernel's ``owner/slug``, for the messages.
        hint: what to do next when the push call itself fails.
        rejected_hint: what to do next when Kaggle rejects some of the kernel's sources (``invalid_*_sources``).
        answered_hint: what to do next when Kaggle answers the push with an error.

    Returns:
        Kaggle's answer (``version_number``, ``url``).

    Raises:
        RemoteError: the push failed, Kaggle answered an error, or it rejected a source.
    """
    resp = k.call("kernel push", k.api.kernels_push, str(folder), idempotent=False, hint=hint)
    if getattr(resp, "error", None):
        raise RemoteError(f"kernel {ref}: Kaggle answered: {resp.error}", answered_hint)
    invalid = {
        kind: list(getattr(resp, f"invalid_{kind}_sources", None) or [])
        for kind in ("dataset", "competition", "kernel", "model")
    }
    invalid = {kind: v for kind, v in invalid.items() if v}
    if invalid:
        what = ", ".join(f"{kind}_sources {v}" for kind, v in invalid.items())
        raise RemoteError(f"kernel {ref}: Kaggle rejected {what}", rejected_hint)
    return resp
