"""Kaggle metadata files: templating with the user's name, and local validation.

The repository root holds ``dataset-metadata.json`` (the bundle dataset) and ``kernel-metadata.json``
(the submission kernel). Their owner is never a person's name: the committed files say
``{username}`` and :func:`fill` replaces it at staging time with the name from ``--username``,
``KAGGLE_USERNAME`` or kaggle.json (:func:`resolve_username`).

Everything here is checked before any network call; each problem is one line::

    meta = fill(load_template(repo / "dataset-metadata.json"), resolve_username(None))
    check(validate_dataset_metadata(meta))        # raises MetadataError listing every problem

No function here reads, returns or prints an API key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cellseg.errors import CellsegError
from cellseg.io import atomic_write_text

COMPETITION = "sartorius-cell-instance-segmentation"
DATASET_METADATA = "dataset-metadata.json"
KERNEL_METADATA = "kernel-metadata.json"
PLACEHOLDER = "{username}"

#: A dataset or kernel slug (Kaggle's own pattern).
SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
#: A Kaggle user name as it appears in URLs (lower case; Kaggle allows no other characters in slugs).
OWNER_RE = re.compile(r"^[a-z0-9]+([_-][a-z0-9]+)*$")


class MetadataError(CellsegError):
    """One or more metadata problems; ``problems`` holds one line each, ``str()`` joins them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def kaggle_config_dir() -> Path:
    """Where the kaggle client looks for kaggle.json: ``$KAGGLE_CONFIG_DIR``, ``~/.kaggle``, or
    ``$XDG_CONFIG_HOME/kaggle`` when ``~/.kaggle`` does not exist (the client's own order)."""
    env = os.environ.get("KAGGLE_CONFIG_DIR")
    if env:
        return Path(env)
    home = Path(os.path.expanduser("~")) / ".kaggle"
    if home.exists():
        return home
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(xdg) / "kaggle"


def kaggle_json_path() -> Path:
    """The kaggle.json the client reads (it may not exist)."""
    return kaggle_config_dir() / "kaggle.json"


def credential_search() -> list[str]:
    """Where the kaggle client (2.2.5) looks for credentials, in its order, each with what is there:
    ``KAGGLE_API_TOKEN``, ``~/.kaggle/access_token``, ``KAGGLE_USERNAME`` + ``KAGGLE_KEY``, then the
    one kaggle.json of :func:`kaggle_config_dir` (``$KAGGLE_CONFIG_DIR``, else ``~/.kaggle``, else
    ``$XDG_CONFIG_HOME/kaggle`` = ``~/.config/kaggle`` when ``~/.kaggle`` does not exist). One short
    phrase per place; never a key."""

    def state(path: Path) -> str:
        return f"{path} ({'present' if path.is_file() else 'missing'})"

    home = Path(os.path.expanduser("~")) / ".kaggle"
    env = [v for v in ("KAGGLE_USERNAME", "KAGGLE_KEY") if os.environ.get(v)]
    out = [
        f"KAGGLE_API_TOKEN ({'set' if os.environ.get('KAGGLE_API_TOKEN') else 'unset'})",
        state(home / "access_token"),
        f"KAGGLE_USERNAME + KAGGLE_KEY ({' and '.join(env) + ' set' if env else 'unset'})",
    ]
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return out + [f"$KAGGLE_CONFIG_DIR/kaggle.json = {state(kaggle_config_dir() / 'kaggle.json')}"]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")) / "kaggle"
    if home.exists():
        return out + [state(home / "kaggle.json"), f"not {xdg / 'kaggle.json'} (read only when {home} does not exist)"]
    return out + [f"{home / 'kaggle.json'} (no {home} folder)", f"then {state(xdg / 'kaggle.json')}"]


def _kaggle_json() -> dict[str, Any]:
    """kaggle.json as a dict; {} when there is none. CellsegError when it exists but is not a JSON
    object (telling the user to put it there would be wrong: it is there)."""
    path = kaggle_json_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CellsegError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        where = f" (line {e.lineno} column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise CellsegError(
            f'{path}: not valid JSON{where}; expected {{"username": ..., "key": ...}} as downloaded from '
            "https://www.kaggle.com/settings (Create New Token)"
        ) from None
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: expected a JSON object with username and key, got {type(data).__name__}")
    return data


def has_credentials() -> bool:
    """True when the kaggle client will find credentials without a network call or a prompt:
    ``KAGGLE_USERNAME`` + ``KAGGLE_KEY``, a kaggle.json with both, or an access token."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    data = _kaggle_json()
    if data.get("username") and data.get("key"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    home = Path(os.path.expanduser("~")) / ".kaggle"
    return any((home / n).is_file() and (home / n).read_text().strip() for n in ("access_token", "access_token.txt"))


def resolve_username(explicit: str | None = None) -> str:
    """The Kaggle user name: ``explicit`` (``--username``), else ``KAGGLE_USERNAME``, else kaggle.json's
    ``username``. Lower-cased (Kaggle URLs are). Raises CellsegError when none is known or it is malformed."""
    name = explicit or os.environ.get("KAGGLE_USERNAME") or _kaggle_json().get("username") or ""
    name = str(name).strip().lower()
    if not name:
        raise CellsegError(
            "Kaggle user name unknown: pass --username, set KAGGLE_USERNAME, or put kaggle.json in "
            f"{kaggle_config_dir()}"
        )
    if not OWNER_RE.match(name):
        raise CellsegError(f"Kaggle user name {name!r} is not a valid owner slug (lower-case letters, digits, - or _)")
    return name


def load_template(path: str | Path) -> dict[str, Any]:
    """Read a metadata JSON file (the committed template); CellsegError when missing or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CellsegError(f"{path}: metadata file not found") from None
    except ValueError as e:
        raise CellsegError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: must hold a JSON object")
    return data


def fill(template: Any, username: str) -> Any:
    """A copy of ``template`` with every ``{username}`` in its strings (at any depth) replaced."""
    if isinstance(template, str):
        return template.replace(PLACEHOLDER, username)
    if isinstance(template, list):
        return [fill(v, username) for v in template]
    if isinstance(template, dict):
        return {k: fill(v, username) for k, v in template.items()}
    return template


def slugify(title: str) -> str:
    """The slug Kaggle derives from a kernel title (python-slugify, as the kaggle client uses)."""
    # lazy: python-slugify comes with the kaggle client (a dev extra), not with cellseg's own dependencies
    from slugify import slugify as _slugify

    return _slugify(title)


def _ref_problems(field: str, ref: Any, min_slug: int = 1) -> list[str]:
    """Problems of an ``owner/slug`` reference."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        return [f"{field}: {ref!r} must be 'owner/slug'"]
    owner, slug = ref.split("/")
    out = []
    if PLACEHOLDER in ref:
        out.append(f"{field}: {ref!r} still holds the {PLACEHOLDER} placeholder (pass --username)")
    elif not OWNER_RE.match(owner):
        out.append(f"{field}: owner {owner!r} is not a valid user name")
    if PLACEHOLDER not in ref and not SLUG_RE.match(slug):
        out.append(f"{field}: slug {slug!r} must match {SLUG_RE.pattern} (lower-case letters, digits, single hyphens)")
    elif len(slug) < min_slug:
        out.append(f"{field}: slug {slug!r} is shorter than {min_slug} characters")
    return out


def validate_dataset_metadata(meta: dict[str, Any]) -> list[str]:
    """Problems (one line each) that would make Kaggle refuse, or misfile, the bundle dataset."""
    out: list[str] = []
    ref = meta.get("id")
    out += _ref_problems("dataset id", ref)
    if isinstance(ref, str) and ref.count("/") == 1:
        slug = ref.split("/")[1]
        if not 6 <= len(slug) <= 50:
            out.append(f"dataset id: slug {slug!r} has {len(slug)} characters (Kaggle wants 6-50)")
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        out.append(f"dataset title: {title!r} must be a string of 6-50 characters")
    subtitle = meta.get("subtitle")
    if subtitle and not (isinstance(subtitle, str) and 20 <= len(subtitle) <= 80):
        out.append(f"dataset subtitle: must be 20-80 characters (has {len(str(subtitle))})")
    licenses = meta.get("licenses")
    if not (isinstance(licenses, list) and len(licenses) == 1 and isinstance(licenses[0], dict)):
        out.append('dataset licenses: must list exactly one license, e.g. [{"name": "CC0-1.0"}]')
    elif not (isinstance(licenses[0].get("name"), str) and licenses[0]["name"]):
        out.append("dataset licenses: the license needs a name, e.g. CC0-1.0")
    keywords = meta.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        out.append("dataset keywords: must be a list of strings")
    return out


def _source_and_shape_problems(meta: dict[str, Any]) -> list[str]:
    """A kernel listed as its own source (Kaggle documents no such thing), and a malformed machine_shape."""
    out = []
    ref = meta.get("id")
    if isinstance(ref, str) and ref in (meta.get("kernel_sources") or []):
        out.append(f"kernel kernel_sources: {ref!r} lists the kernel itself (resume into a new session instead)")
    shape = meta.get("machine_shape")
    if shape is not None and not (isinstance(shape, str) and shape):
        out.append(f"kernel machine_shape: {shape!r} must be an accelerator id such as 'NvidiaTeslaT4'")
    return out


def validate_kernel_metadata(meta: dict[str, Any], folder: str | Path) -> list[str]:
    """Problems of a kernel's metadata; ``code_file`` is resolved against ``folder``."""
    out: list[str] = []
    ref = meta.get("id")
    out += _ref_problems("kernel id", ref, min_slug=5)
    title = meta.get("title")
    if not isinstance(title, str) or len(title) < 5:
        out.append(f"kernel title: {title!r} must be a string of at least 5 characters")
    elif isinstance(ref, str) and ref.count("/") == 1 and slugify(title) != ref.split("/")[1]:
        out.append(f"kernel title: {title!r} slugifies to {slugify(title)!r}, not the id's slug {ref.split('/')[1]!r}")
    code = meta.get("code_file")
    if not isinstance(code, str) or not code:
        out.append("kernel code_file: missing")
    elif Path(code).is_absolute() or ".." in Path(code).parts:
        out.append(f"kernel code_file: {code!r} must be a relative path inside the kernel folder")
    elif not (Path(folder) / code).is_file():
        out.append(f"kernel code_file: {Path(folder) / code} not found")
    if meta.get("language") != "python":
        out.append(f"kernel language: {meta.get('language')!r} (must be 'python')")
    if meta.get("kernel_type") not in ("script", "notebook"):
        out.append(f"kernel kernel_type: {meta.get('kernel_type')!r} (must be 'script' or 'notebook')")
    for key, want in (("enable_internet", False), ("enable_gpu", True), ("is_private", True)):
        if meta.get(key) is not want:
            # The client's default for enable_internet is TRUE, and a competition rerun needs it off.
            out.append(
                f"kernel {key}: must be written explicitly as {json.dumps(want)} (is {json.dumps(meta.get(key))})"
            )
    for key in ("dataset_sources", "kernel_sources"):
        sources = meta.get(key, [])
        if not isinstance(sources, list):
            out.append(f"kernel {key}: must be a list of 'owner/slug'")
            continue
        for s in sources:
            out += _ref_problems(f"kernel {key}", s)
    out += _source_and_shape_problems(meta)
    comps = meta.get("competition_sources", [])
    if not isinstance(comps, list) or COMPETITION not in comps:
        out.append(f"kernel competition_sources: must include {COMPETITION!r}")
    else:
        out += [
            f"kernel competition_sources: {c!r} is not a slug"
            for c in comps
            if not (isinstance(c, str) and SLUG_RE.match(c))
        ]
    return out


def check(problems: list[str]) -> None:
    """Raise :class:`MetadataError` when ``problems`` is not empty."""
    if problems:
        raise MetadataError(problems)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write metadata as indented JSON (atomic)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
