"""A loopback fake of the Kaggle API for tests: the real ``kaggle`` client talks to it over HTTP.

It speaks the wire protocol of kaggle 2.2.5 / kagglesdk 0.1.38: every call is
``POST /api/v1/{Service}/{Method}`` with a camelCase JSON body; errors are ``{"code", "message"}``
with the same HTTP status; blob uploads are ``StartBlobUpload`` -> ``PUT createUrl``. It keeps just
enough state to behave like Kaggle where the traps are: a dataset version is refused with 403 while
the previous one still processes, versioning an unknown dataset is a 404, a kernel's unknown dataset
source comes back in ``invalidDatasetSources``. Every request is recorded (``server.calls``).

    with FakeKaggle(username="alice", key="k3y") as fake:
        env = {"CELLSEG_KAGGLE_ENDPOINT": fake.url, ...}
        ...
        assert fake.methods() == ["GetDatasetStatus", "StartBlobUpload", ...]

Scripting: ``fake.fail(method, code, message, times=1)`` answers the next ``times`` calls of
``method`` (e.g. "CreateDatasetVersion", or "PUT" for uploads) with that error; ``processing_polls``
is how many status polls a new dataset version stays ``BLOBS_RECEIVED`` before ``READY``;
``kernel_statuses`` / ``submission_statuses`` are the states successive polls report
(``kernel_statuses_by_slug[slug]`` for one kernel, when several are polled at once).

Kernel output (``ListKernelSessionOutput`` + the signed-URL download the client then GETs):
``fake.set_output("alice/k", {"run/last.pth": b"..."}, log="...", version=3)`` serves those files,
of the latest version unless the request names one (``versionLabel`` "v3"); ``kernels_known`` are
kernels that exist without having been pushed here (valid ``kernel_sources``). A kernel Kaggle does
not know answers 404 (status, output, ``GetKernel``).

Kernel versions are counted per kernel, as on Kaggle: a push answers ``versionNumber`` = the
kernel's current version (``kernel_versions[ref]``) + 1; the version leaves the output
``set_output`` gave for that number, else ``pushed_output``.
Status polls with a ``versionLabel`` report that version (the one just pushed follows
``kernel_statuses``; older ones ``version_statuses[(ref, n)]``, default COMPLETE). A poll WITHOUT a
version reports the previous version while there is one: Kaggle's answer right after a push, the
trap that reads an old COMPLETE as the new run's.

``gpu_quota_hours = (used, reserved, allowed)`` answers ``GetAcceleratorQuotaStatistics`` with the
client's wire format (durations as "<seconds>s").
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Call:
    method: str  # "GetDatasetStatus", ..., or "PUT" for an upload
    body: Any  # parsed JSON body, or for PUT: {"token", "bytes", "content_range"}
    status: int = 200


@dataclass
class Upload:
    name: str
    content_length: int
    data: bytearray = field(default_factory=bytearray)

    @property
    def complete(self) -> bool:
        return len(self.data) == self.content_length


@dataclass
class Dataset:
    ref: str
    versions: list[dict] = field(default_factory=list)  # {"notes", "files": [(name, size)], "is_private"}
    pending_polls: int = 0  # status polls left before the latest version is READY


class FakeKaggle:
    def __init__(self, username: str = "alice", key: str = "not-a-real-key", processing_polls: int = 1):
        self.username, self.key = username, key
        self.processing_polls = processing_polls
        self.calls: list[Call] = []
        self.datasets: dict[str, Dataset] = {}
        self.uploads: dict[str, Upload] = {}
        self.kernels: list[dict] = []  # SaveKernel bodies
        self.kernel_statuses: list[str] = ["QUEUED", "RUNNING", "COMPLETE"]
        self.kernel_statuses_by_slug: dict[str, list[str]] = {}
        self.kernel_outputs: dict[str, dict[int, dict]] = {}  # "owner/slug" -> version -> {"files", "log"}
        self.kernels_known: set[str] = set()
        self.kernel_versions: dict[str, int] = {}  # "owner/slug" -> current version number
        self.version_statuses: dict[tuple[str, int], str] = {}  # status of older versions (default COMPLETE)
        self.pushed_output: dict[str, bytes] = {}  # the output files of every version pushed here
        self.gpu_quota_hours: tuple[float, float, float] = (0.0, 0.0, 30.0)  # used, reserved, allowed
        self.blobs: dict[str, bytes] = {}  # download id -> bytes served by GET /download/<id>
        self.kernel_failure = "Your notebook hit an error"
        self.kernel_log = (
            '[{"stream_name":"stdout","time":1.0,"data":"loading weights\\n"},'
            '{"stream_name":"stderr","time":2.0,"data":"Traceback: boom\\n"}]'
        )
        self.rejected_sources: list[str] = []  # reported in invalidDatasetSources even when they exist
        self.submissions: list[dict] = []
        self.submission_statuses: list[str] = ["PENDING", "COMPLETE"]
        self.public_score = "0.301"
        self._faults: dict[str, list[tuple[int, str]]] = {}
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> FakeKaggle:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- scripting and inspection -----------------------------------------------------------

    def fail(self, method: str, code: int, message: str, times: int = 1, after: int = 0, then=None) -> None:
        """Answer ``times`` calls of ``method`` with ``code``/``message``, after letting ``after`` calls
        through; ``then()`` runs (under the lock) each time the fault fires."""
        self._faults.setdefault(method, []).extend([None] * after + [(code, message, then)] * times)

    def add_dataset(self, ref: str, pending_polls: int = 0) -> Dataset:
        ds = self.datasets[ref] = Dataset(ref, [{"notes": "v1", "files": [], "is_private": True}], pending_polls)
        return ds

    def set_output(self, ref: str, files: dict[str, bytes], log: str | None = None, version: int = 1) -> None:
        """Make ``files`` (relative path -> bytes) the output of kernel ``ref`` version ``version``."""
        self.kernel_outputs.setdefault(ref, {})[version] = {"files": dict(files), "log": log or ""}
        self.kernels_known.add(ref)

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def bodies(self, method: str) -> list[Any]:
        return [c.body for c in self.calls if c.method == method and c.status == 200]

    def uploaded(self, token: str) -> tuple[str, bytes]:
        """(name, bytes) of a finished upload."""
        up = self.uploads[token]
        assert up.complete, f"upload {token} ({up.name}) incomplete"
        return up.name, bytes(up.data)

    # -- request handling (under the lock) --------------------------------------------------

    def _fault(self, method: str) -> tuple[int, str] | None:
        queue = self._faults.get(method)
        fault = queue.pop(0) if queue else None
        if fault is None:
            return None
        code, message, then = fault
        if then is not None:
            then()
        return code, message

    def _resolve_files(self, files: list[dict]) -> list[tuple[str, int]]:
        out = []
        for f in files:
            up = self.uploads.get(f.get("token", ""))
            if up is None or not up.complete:
                raise _Error(400, f"blob token {f.get('token')!r} is unknown or its upload is incomplete")
            out.append((up.name, up.content_length))
        return out

    def handle(self, method: str, body: dict) -> dict:
        """Answer one RPC the way Kaggle does: ``_rpc_<Method>(body)``, or 404 for one we do not fake."""
        answer = getattr(self, f"_rpc_{method}", None)
        if answer is None:
            raise _Error(404, f"fake Kaggle does not implement {method}")
        return answer(body)

    def _rpc_StartBlobUpload(self, body: dict) -> dict:
        token = f"tok{len(self.uploads) + 1}"
        self.uploads[token] = Upload(body["name"], int(body.get("contentLength", 0)))
        return {"token": token, "createUrl": f"{self.url}/upload/{token}"}

    def _rpc_GetDatasetStatus(self, body: dict) -> dict:
        ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
        ds = self.datasets.get(ref)
        if ds is None:
            raise _Error(404, f"Dataset {ref} not found")
        if ds.pending_polls > 0:
            ds.pending_polls -= 1
            return {"status": "BLOBS_RECEIVED"}
        return {"status": "READY"}

    def _rpc_CreateDataset(self, body: dict) -> dict:
        ref = f"{body['ownerSlug']}/{body['slug']}"
        if ref in self.datasets:
            return {"error": f"The requested slug {body['slug']} is already in use"}
        files = self._resolve_files(body.get("files", []))
        self.datasets[ref] = Dataset(
            ref,
            [
                {
                    "notes": None,
                    "files": files,
                    "is_private": body.get("isPrivate"),
                    "title": body.get("title"),
                    "license": body.get("licenseName"),
                }
            ],
            self.processing_polls,
        )
        return {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"}

    def _rpc_CreateDatasetVersion(self, body: dict) -> dict:
        ref = f"{body['ownerSlug']}/{body['datasetSlug']}"
        ds = self.datasets.get(ref)
        if ds is None:
            raise _Error(404, f"Dataset {ref} not found")
        if ds.pending_polls > 0:
            raise _Error(
                403, "Permission 'datasets.versions.create' was denied: a previous version is still processing"
            )
        files = self._resolve_files(body["body"].get("files", []))
        ds.versions.append({"notes": body["body"].get("versionNotes"), "files": files})
        ds.pending_polls = self.processing_polls
        return {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"}

    def _rpc_SaveKernel(self, body: dict) -> dict:
        self.kernels.append(body)
        owner_slug = body.get("slug", "")
        version = self.kernel_versions.get(owner_slug, 0) + 1
        self.kernel_versions[owner_slug] = version
        outputs = self.kernel_outputs.setdefault(owner_slug, {})  # one set_output() for this version wins
        outputs.setdefault(version, {"files": dict(self.pushed_output), "log": None})
        self._polls["kernel"] = 0
        self._polls[f"kernel:{owner_slug}"] = 0
        invalid = [
            s for s in body.get("datasetDataSources", []) if s not in self.datasets or s in self.rejected_sources
        ]
        known = self.kernels_known | {k.get("slug") for k in self.kernels[:-1]}
        invalid_kernels = [s for s in body.get("kernelDataSources", []) if s not in known or s == owner_slug]
        return {
            "ref": f"/code/{owner_slug}",
            "url": f"https://www.kaggle.com/code/{owner_slug}",
            "versionNumber": version,
            "invalidDatasetSources": invalid,
            "invalidKernelSources": invalid_kernels,
        }

    def _rpc_GetKernelSessionStatus(self, body: dict) -> dict:
        ref = self._known_kernel(body)
        latest = self.kernel_versions.get(ref, 0)
        label = body.get("versionLabel")
        version = int(label.lstrip("v")) if label else None
        if version is None and latest > 1:  # the previous version, as Kaggle answers right after a push
            version = latest - 1
        if version is not None and version != latest:
            if not 1 <= version <= latest:
                raise _Error(404, f"Kernel {ref} has no version {label}")
            status = self.version_statuses.get((ref, version), "COMPLETE")
            return {"status": status, **({"failureMessage": self.kernel_failure} if status == "ERROR" else {})}
        if ref in self.kernel_statuses_by_slug:
            return self._next(
                f"kernel:{ref}", self.kernel_statuses_by_slug[ref], {"failureMessage": self.kernel_failure}
            )
        return self._next("kernel", self.kernel_statuses, {"failureMessage": self.kernel_failure})

    def _rpc_GetKernel(self, body: dict) -> dict:
        ref = self._known_kernel(body)
        return {
            "metadata": {
                "ref": ref,
                "slug": ref.split("/")[1],
                "currentVersionNumber": self.kernel_versions.get(ref),
            },
            "blob": {"source": "", "language": "python", "kernelType": "script", "slug": ref.split("/")[1]},
        }

    def _rpc_GetAcceleratorQuotaStatistics(self, body: dict) -> dict:
        used, reserved, allowed = self.gpu_quota_hours
        hours = {
            "timeUsed": used,
            "timeReserved": reserved,
            "totalTimeAllowed": allowed,
            "minimumTimeAllowed": allowed,
        }
        return {
            "quotaRefreshTime": "2026-12-07T00:00:00.000Z",
            "gpuQuota": {**{k: f"{int(v * 3600)}s" for k, v in hours.items()}, "hasEverRun": True},
            "tpuQuota": {"timeUsed": "0s", "totalTimeAllowed": "72000s"},
        }

    def _rpc_ListKernelSessionOutput(self, body: dict) -> dict:
        ref = self._known_kernel(body)
        versions = self.kernel_outputs.get(ref)
        if not versions:
            return {"files": [], "log": self.kernel_log}
        label = body.get("versionLabel")
        version = int(label.lstrip("v")) if label else max(versions)
        if version not in versions:
            if 1 <= version <= self.kernel_versions.get(ref, 0):
                return {"files": [], "log": self.kernel_log}
            raise _Error(404, f"Kernel {ref} has no version {label}")
        out = versions[version]
        files = []
        for name, data in out["files"].items():
            blob = f"b{len(self.blobs) + 1}"
            self.blobs[blob] = data
            files.append({"fileName": name, "url": f"{self.url}/download/{blob}"})
        return {"files": files, "log": self.kernel_log if out["log"] is None else out["log"]}

    def _rpc_CreateCodeSubmission(self, body: dict) -> dict:
        self.submissions.append(body)
        self._polls["submission"] = 0
        return {"message": "Submission successful", "ref": 1000 + len(self.submissions)}

    def _rpc_GetSubmission(self, body: dict) -> dict:
        out = self._next("submission", self.submission_statuses, {})
        out.update(ref=body.get("ref"))
        if out["status"] == "COMPLETE":
            out["publicScore"] = self.public_score
        if out["status"] == "ERROR":
            out["errorDescription"] = "Submission scoring error"
        return out

    def _known_kernel(self, body: dict) -> str:
        """``owner/slug`` of a kernel request; 404 when Kaggle would not know that kernel."""
        ref = f"{body.get('userName')}/{body.get('kernelSlug')}"
        if ref not in self.kernels_known and ref not in self.kernel_versions:
            raise _Error(404, f"Kernel {ref} not found")
        return ref

    def _next(self, key: str, states: list[str], on_error: dict) -> dict:
        i = self._polls.get(key, 0)
        self._polls[key] = i + 1
        status = states[min(i, len(states) - 1)]
        return {"status": status, **(on_error if status == "ERROR" else {})}

    def put(self, token: str, data: bytes, content_range: str | None) -> tuple[int, dict]:
        up = self.uploads.get(token)
        if up is None:
            return 404, {}
        if content_range and content_range.startswith("bytes */"):  # resume probe
            if up.complete:
                return 200, {}
            return 308, ({"Range": f"bytes=0-{len(up.data) - 1}"} if up.data else {})
        start = int(content_range.split()[1].split("-")[0]) if content_range else 0
        del up.data[start:]
        up.data += data
        return (200 if up.complete else 308), {}


class _Error(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeKaggle

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, code: int, payload: dict | None, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        fake = self.server_fake
        want = "Basic " + base64.b64encode(f"{fake.username}:{fake.key}".encode()).decode()
        return self.headers.get("Authorization") == want

    def do_POST(self) -> None:
        fake = self.server_fake
        raw = self._read_body()
        parts = self.path.strip("/").split("/")  # api, v1, Service, Method
        method = parts[-1] if len(parts) == 4 and parts[:2] == ["api", "v1"] else self.path
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_raw": raw[:200].decode(errors="replace")}
        with fake._lock:
            call = Call(method, body)
            fake.calls.append(call)
            try:
                if not self._authorized():
                    raise _Error(401, "Unauthenticated")
                fault = fake._fault(method)
                if fault:
                    raise _Error(*fault)
                payload = fake.handle(method, body)
            except _Error as e:
                call.status = e.code
                payload = {"code": e.code, "message": e.message}
        self._send(call.status, payload)

    def do_GET(self) -> None:  # the signed URLs of kernel output files
        fake = self.server_fake
        blob = self.path.rstrip("/").split("/")[-1]
        with fake._lock:
            call = Call("GET", {"blob": blob})
            fake.calls.append(call)
            fault = fake._fault("GET")
            data = fake.blobs.get(blob)
            if fault:
                call.status = fault[0]
            elif data is None:
                call.status = 404
        if call.status != 200:
            self._send(call.status, {"code": call.status, "message": "download failed"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        fake = self.server_fake
        data = self._read_body()
        token = self.path.rstrip("/").split("/")[-1]
        content_range = self.headers.get("Content-Range")
        with fake._lock:
            call = Call("PUT", {"token": token, "bytes": len(data), "content_range": content_range})
            fake.calls.append(call)
            fault = fake._fault("PUT")
            if fault:
                call.status, headers = fault[0], {}
            else:
                call.status, headers = fake.put(token, data, content_range)
        self._send(call.status, None, headers)


# ----------------------------------------------------------------------------------------------
# Local fixtures for the Kaggle-side tests: a copy of the checkout and a tiny weights folder.

REPO = Path(__file__).resolve().parent.parent
#: A string planted in every file that must never reach a bundle.
PLANTED = "PLANTED-SECRET-7f3a"


def make_checkout(dst: Path) -> Path:
    """Copy what a checkout needs for bundling and pushing into ``dst``: pyproject, README, the
    metadata templates, src/ (no caches) and kernel/ (a stand-in entry when the real one is absent)."""
    dst.mkdir(parents=True)
    for name in (
        "pyproject.toml",
        "README.md",
        "dataset-metadata.json",
        "kernel-metadata.json",
        "dataset-train-metadata.json",
        "kernel-train-metadata.json",
    ):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if (REPO / "kernel").is_dir():
        shutil.copytree(REPO / "kernel", dst / "kernel", ignore=shutil.ignore_patterns("__pycache__"))
    entry = dst / "kernel" / "submit.py"
    if not entry.is_file():
        entry.parent.mkdir(exist_ok=True)
        entry.write_text('"""Stand-in kernel entry for tests (kernel/submit.py not written yet)."""\nprint("submit")\n')
    return dst


def plant_secrets(checkout: Path, weights: Path) -> list[Path]:
    """Put credentials, VCS data, tests, data and caches where a careless bundler would pick them up."""
    secret = json.dumps({"username": "alice", "key": PLANTED})
    files = {
        checkout / "kaggle.json": secret,
        checkout / ".env": f"KAGGLE_KEY={PLANTED}\n",
        checkout / ".git" / "config": f"[remote]\n  token = {PLANTED}\n",
        checkout / "tests" / "test_planted.py": f"KEY = '{PLANTED}'\n",
        checkout / "data" / "train.csv": f"id,annotation\n{PLANTED},1 1\n",
        checkout / "src" / "cellseg" / "kaggle.json": secret,
        checkout / "src" / "cellseg" / ".env": f"KAGGLE_KEY={PLANTED}\n",
        checkout / "src" / "cellseg" / "__pycache__" / "rle.cpython-311.pyc": PLANTED,
        checkout / "src" / "cellseg" / "commands" / "credentials.py": f"KEY = '{PLANTED}'\n",
        weights / "kaggle.json": secret,
        weights / ".env": f"KAGGLE_KEY={PLANTED}\n",
        weights / "notes.txt": f"not listed in the manifest {PLANTED}\n",
        weights / ".ipynb_checkpoints" / "x.json": PLANTED,
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def make_weights(folder: Path, size: int = 50_000, name: str = "demo") -> Path:
    """A weights folder with one random 'checkpoint' and a manifest holding its real sha256."""
    import numpy as np

    from cellseg.config.manifest import Manifest, ModelEntry, default_classes, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pth").write_bytes(np.random.default_rng(0).bytes(size))
    return write_manifest(
        Manifest(name=name, models=[ModelEntry("model.pth")], classes=default_classes()), folder / "manifest.yaml"
    )
