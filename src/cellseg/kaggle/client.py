"""The real ``kaggle`` client behind one bounded retry policy, and the failures ``tools/push.py``
reports itself (one line each, exit 2 for bad input, 1 for a remote failure).

``kaggle`` is imported only inside :class:`Kaggle` (importing it authenticates and may exit), so this
module, like the rest of ``cellseg.kaggle``, imports without the client installed: the Kaggle kernel's
inference path never needs it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cellseg.errors import CellsegError
from cellseg.kaggle import metadata as km

ENDPOINT_ENV = "CELLSEG_KAGGLE_ENDPOINT"


class PushError(Exception):
    """A failure push.py reports itself (no traceback)."""


class UsageError(PushError):
    """Bad input, credentials or metadata: exit 2. ``lines`` are printed one per line."""

    def __init__(self, *lines: str):
        self.lines = list(lines)
        super().__init__("; ".join(lines))


class RemoteError(PushError):
    """Kaggle refused or failed: exit 1, with ``hint`` saying what to do next."""

    def __init__(self, message: str, hint: str = ""):
        self.hint = hint
        super().__init__(message)


def seconds(text: str) -> float:
    """argparse type of ``--retry-budget``, ``--poll-interval`` and ``--wait-timeout``: a finite number
    of seconds >= 0 (``nan`` would make every deadline comparison false, so a budget never ran out)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds >= 0")
    return value


def version_number(text: str) -> int:
    """argparse type of a kernel version: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: kernel versions start at 1")
    return value


def say(*msg: Any) -> None:
    print(*msg, flush=True)


def warn(msg: str) -> None:
    print(f"push.py: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The kaggle client, with bounded retries and readable errors


def http_status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def describe(e: BaseException) -> str:
    """One line for an exception from the client: the server's own message on HTTP errors."""
    code = http_status(e)
    if code is not None:
        return f"HTTP {code}: {str(e) or 'no message'}"
    name = type(e).__name__
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{name}: {text}" if text else name


def transient(e: BaseException) -> bool:
    """Connection errors, timeouts, 5xx and 429 are worth retrying; everything else is an answer."""
    import requests
    import urllib3.exceptions as u3

    code = http_status(e)
    if code is not None:
        return code >= 500 or code == 429
    return isinstance(e, (requests.ConnectionError, requests.Timeout, u3.HTTPError, ConnectionError))


def check_endpoint(endpoint: str) -> None:
    """Refuse (exit 2) a ``CELLSEG_KAGGLE_ENDPOINT`` that is not ``http(s)://host[:port]``."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(endpoint)
        port_ok = url.port is None or url.port > 0
    except ValueError:
        url, port_ok = None, False
    if url is None or url.scheme not in ("http", "https") or not url.hostname or not port_ok:
        raise UsageError(f"{ENDPOINT_ENV}={endpoint!r} is not an http(s)://host[:port] URL (unset it to use Kaggle)")


class Kaggle:
    """The real ``KaggleApi``, imported only after credentials are known to exist (the import
    authenticates and may exit), with one bounded retry policy for every call."""

    def __init__(self, retry_budget: float, poll_interval: float, wait_timeout: float):
        self.retry_budget = retry_budget
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout
        if not km.has_credentials():
            raise UsageError(
                "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or save kaggle.json (chmod 600) in "
                f"{km.kaggle_config_dir()} (https://www.kaggle.com/settings -> Create New Token); "
                f"searched, in the client's order: {'; '.join(km.credential_search())}"
            )
        cfg = km.kaggle_json_path()
        if cfg.is_file() and os.name != "nt" and cfg.stat().st_mode & 0o077:
            warn(
                f"warning: {cfg} is readable by other users (mode {cfg.stat().st_mode & 0o777:o}); run: chmod 600 {cfg}"
            )
        # The client's verbose mode prints request headers, Authorization included.
        for var in ("VERBOSE", "VERBOSE_OUTPUT"):
            os.environ.pop(var, None)
        endpoint = os.environ.get(ENDPOINT_ENV)
        if endpoint:
            check_endpoint(endpoint)
            os.environ["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
        try:
            import kagglesdk.kaggle_env as kenv

            if endpoint:
                kenv._env_to_endpoint[kenv.KaggleEnv.LOCAL] = endpoint.rstrip("/")
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.args = ["--local"] if endpoint else []
            api.authenticate()
        except SystemExit:
            raise UsageError("the kaggle client refused the credentials (see its message above)") from None
        except ImportError as e:
            raise UsageError(f"the kaggle client is not installed ({e}): pip install kaggle==2.2.5 six") from None
        # The client retries some calls itself (uploads, create version, get submission) for up to
        # minutes; route those through the same bounded policy.
        api.with_retry = lambda func, *a, **kw: lambda *fa, **fkw: self.retrying(func.__name__, func, *fa, **fkw)
        self.api = api

    def retrying(self, what: str, fn: Callable, *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        """Call ``fn``; retry transient failures with exponential backoff within ``retry_budget``
        seconds. Non-idempotent calls are retried only when the connection failed outright.
        Other exceptions propagate unchanged; an exhausted budget raises :class:`RemoteError`."""
        import requests

        deadline = time.monotonic() + self.retry_budget
        delay = min(1.0, max(self.retry_budget / 8, 0.05))
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except SystemExit as e:  # the client calls exit() on some failures
                raise RemoteError(f"{what}: the kaggle client gave up (exit {e.code})") from None
            except Exception as e:
                if http_status(e) == 401:
                    raise UsageError(
                        f"Kaggle rejected the credentials ({describe(e)}): check KAGGLE_KEY or "
                        f"{km.kaggle_config_dir() / 'kaggle.json'}"
                    ) from None
                retry = (
                    transient(e) if idempotent else isinstance(e, requests.ConnectionError) and http_status(e) is None
                )
                left = deadline - time.monotonic()
                if not retry:
                    raise
                if left <= 0:
                    raise RemoteError(
                        f"{what}: gave up after {attempt} attempts in {self.retry_budget:g} s ({describe(e)})",
                        "check your connection and https://status.kaggle.com, then run the same command again",
                    ) from None
                pause = delay
                after = getattr(getattr(e, "response", None), "headers", {}) or {}
                if http_status(e) == 429 and str(after.get("Retry-After", "")).isdigit():
                    pause = float(after["Retry-After"])
                pause = min(pause, left)
                warn(f"{what}: {describe(e)}; retry {attempt} in {pause:.1f} s")
                time.sleep(pause)
                delay *= 2

    def call(self, what: str, fn: Callable, *args: Any, hint: str = "", **kwargs: Any) -> Any:
        """:meth:`retrying`, with any remaining failure turned into a :class:`RemoteError`."""
        try:
            return self.retrying(what, fn, *args, **kwargs)
        except PushError:
            raise
        except Exception as e:
            raise RemoteError(f"{what}: {describe(e)}", hint) from None

    # -- datasets ---------------------------------------------------------------------------

    def dataset_state(self, ref: str) -> str | None:
        """Lower-case status of the dataset's latest version ('ready', 'blobs_received', ...), None if absent."""
        try:
            return self.retrying("dataset status", self.api.dataset_status, ref)
        except PushError:
            raise
        except Exception as e:
            if http_status(e) == 404:
                return None
            # Only Kaggle's own answer says something about the name; anything else is the connection.
            hint = (
                "check --username and that you can see the dataset"
                if http_status(e) is not None
                else "check your connection (and CELLSEG_KAGGLE_ENDPOINT, if set), then run the same command again"
            )
            raise RemoteError(f"dataset status of {ref}: {describe(e)}", hint) from None

    def wait_dataset(self, ref: str, accept_failed: bool = False) -> str:
        """Poll until the latest version is ready (or failed, when ``accept_failed``)."""
        start = time.monotonic()
        last = None
        while True:
            state = self.dataset_state(ref)
            if state is None:
                raise RemoteError(f"dataset {ref} does not exist on Kaggle", "run: python tools/push.py dataset")
            if state != last:
                say(f"dataset {ref}: {state}")
                last = state
            if state == "ready" or (accept_failed and state in ("failed", "deleted")):
                return state
            if state in ("failed", "deleted"):
                raise RemoteError(
                    f"dataset {ref}: the new version {state} while Kaggle processed it",
                    f"open https://www.kaggle.com/datasets/{ref} for details, then push the dataset again",
                )
            if time.monotonic() - start > self.wait_timeout:
                raise RemoteError(
                    f"dataset {ref} still '{state}' after {self.wait_timeout:g} s", "run the same command again later"
                )
            time.sleep(self.poll_interval)

    # -- kernels ----------------------------------------------------------------------------

    def current_version(self, ref: str) -> int | None:
        """The current (newest) version number of kernel ``owner/slug`` (``GetKernel``)."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

        owner, slug = ref.split("/")[:2]

        def get() -> Any:
            with self.api.build_kaggle_client() as client:
                req = ApiGetKernelRequest()
                req.user_name, req.kernel_slug = owner, slug
                return client.kernels.kernels_api_client.get_kernel(req)

        resp = self.call("kernel versions", get, hint=f"check that the kernel {ref} exists and is yours")
        return getattr(resp.metadata, "current_version_number", None) if resp.metadata else None

    # -- the weekly GPU quota ---------------------------------------------------------------

    def gpu_quota_hours(self) -> tuple[float, float] | None:
        """(hours allowed this week, hours left: allowed - used - reserved by running sessions) from
        ``quota_view()``; None, with a warning, when the quota cannot be read."""
        try:
            resp = self.retrying("GPU quota", self.api.quota_view)
            gpu = resp.gpu_quota
            allowed = gpu.total_time_allowed.total_seconds() / 3600
            used = sum(t.total_seconds() for t in (gpu.time_used, gpu.time_reserved) if t is not None) / 3600
        except UsageError:
            raise
        except Exception as e:  # the quota is advisory: any other failure only warns
            warn(f"warning: could not read the weekly GPU quota ({describe(e)}); going on without checking it")
            return None
        return allowed, allowed - used


def report_errors(step: Callable[[], int]) -> int:
    """Run ``step`` and turn the failures push.py reports itself into lines and an exit status:
    2 for bad input, credentials or metadata; 1 for a remote failure (with the next step); 130 on ^C."""
    try:
        return step()
    except UsageError as e:
        for line in e.lines:
            print(f"push.py: error: {line}", file=sys.stderr)
        return 2
    except km.MetadataError as e:
        for line in e.problems:
            print(f"push.py: error: {line}", file=sys.stderr)
        return 2
    except CellsegError as e:
        print(f"push.py: error: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        print(f"push.py: failed: {e}", file=sys.stderr)
        if e.hint:
            print(f"push.py: next: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("push.py: interrupted (nothing is left half-done: run the same command again)", file=sys.stderr)
        return 130
