"""Predict a competition-layout folder's ``test/`` into ``submission.csv``: the kernel's pipeline.

    result = predict_folder("data/", "weights/demo/manifest.yaml", "submission.csv", time_budget="8h30m")

Order of work: ``out`` is checked writable, the manifest loaded with every checksum verified and
the models loaded once (:meth:`cellseg.inference.ensemble.Ensemble.load`); then for each test image:
read (odd images converted by cellseg.io.read_gray) -> ``Ensemble.forward`` -> ``Ensemble.finish``
-> RLE per instance (:func:`cellseg.data.rle.encode_crop`). The submission is written atomically with
every test id (and an empty row for each ``sample_submission.csv`` id without a PNG) and validated
before returning; it is written even when every image fails or ``test/`` is empty.

One image's failure costs only that image: an unreadable PNG, or any exception in its forward,
vote, fusion, post-processing or encoding, is logged, recorded in ``RunResult.failed`` and gives an
empty row, and the run goes on. A CUDA error moves the run to the CPU (the models are loaded again
there, one loud log line) and the image is tried once more.

Time budget (:class:`BudgetController`, on an injected clock): one model x the identity view is first
run twice on the first test image, a warm-up (on a GPU the first forward includes cuDNN start-up and
lazy kernel loading, seconds that later forwards do not pay) and a timed run whose output that image
then uses. A failed calibration is tried once more (on the CPU after a CUDA error); when it fails
again its image gets an empty row and the next image calibrates. Before every image the remaining
work is projected from the measured seconds per (model x view) unit (median of the last five) and
planned afresh from the manifest's full view and model lists: while it would not fit, TTA views are
dropped (last listed first), then models (lowest weight first), and they come back as soon as the
time left allows; every change of plan is logged. If even one model x one view does not fit, images
are processed while time remains and the rest get empty rows: the run never overruns.

On CUDA the CPU half of image k (``Ensemble.finish`` + RLE) runs in a worker thread while the device
runs image k + 1 (:class:`Overlap`).
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cellseg.config.loader import parse_duration
from cellseg.config.manifest import Manifest, load_manifest
from cellseg.data.rle import encode_crop
from cellseg.data.submission import validate_submission, write_submission
from cellseg.data.truth import read_sample_submission
from cellseg.errors import CellsegError
from cellseg.inference.device import resolve_device
from cellseg.inference.ensemble import Ensemble, ImageResult, OutOfMemoryError
from cellseg.inference.forward import RawView
from cellseg.io import check_writable, list_pngs, read_gray
from cellseg.model.provenance import summarize
from cellseg.paths import CompetitionPaths

Log = Callable[[str], None]
#: seconds from an arbitrary origin, never going back (``time.monotonic``; tests give a fake one)
Clock = Callable[[], float]


def _default_log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- time budget


@dataclass
class BudgetPlan:
    views: list[str]
    models: list[int]  # indices into the manifest's models
    decisions: list[str] = field(default_factory=list)


def plan_within_budget(
    views: Sequence[str],
    models: Sequence[int],
    weights: Sequence[float],
    seconds_per_unit: float,
    images_left: int,
    seconds_left: float,
) -> BudgetPlan:
    """Shrink the work until ``images_left`` x units x ``seconds_per_unit`` fits ``seconds_left``.

    A unit is one model x one view of one image. Views are dropped last-first (identity is kept),
    then models lowest ``weights[m]`` first. Pure function: returns the plan and one line per drop.
    """
    views, models = list(views), list(models)
    decisions: list[str] = []

    def projected() -> float:
        return images_left * seconds_per_unit * len(views) * len(models)

    while projected() > seconds_left and (len(views) > 1 or len(models) > 1):
        before = projected()
        if len(views) > 1:
            drop = next((v for v in reversed(views) if v != "identity"), views[-1])
            views.remove(drop)
            what = f"dropping TTA view {drop}"
        else:
            drop_m = min(models, key=lambda m: (weights[m], -m))
            models.remove(drop_m)
            what = f"dropping model #{drop_m} (weight {weights[drop_m]:g})"
        decisions.append(
            f"time budget: {images_left} images projected at {before:.0f}s > {seconds_left:.0f}s left: "
            f"{what} -> {projected():.0f}s"
        )
    return BudgetPlan(views, models, decisions)


# ----------------------------------------------------------------------------- a folder


@dataclass
class RunResult:
    """What :func:`predict_folder` did, image by image.

    Attributes:
        out: the submission written.
        rows: id -> its RLEs (empty for a failed or skipped image).
        cell_types: id -> voted cell type, for each predicted image.
        seconds: id -> seconds per image (throughput, on the run's clock), for each processed image.
        failed: id -> one-line reason, for each image that got an empty row because something failed.
        skipped: ids left empty for the time budget.
        decisions: the time budget's log lines (views / models dropped or back, the stop).
        load_s, total_s: seconds to load the models, and for the whole run.
        device: where the models ran at the end ("cpu" after a CUDA failure).
        forward_s, rest_s: summed seconds of the forwards and of the CPU halves.
        views, models: the views and the number of models of the last plan.
    """

    out: Path
    rows: dict[str, list[str]]
    cell_types: dict[str, str]
    seconds: dict[str, float]
    failed: dict[str, str]
    skipped: list[str]
    decisions: list[str]
    load_s: float
    total_s: float
    device: str
    forward_s: float = 0.0
    rest_s: float = 0.0
    views: list[str] = field(default_factory=list)
    models: int = 0

    def nothing_predicted(self, test_dir: Path) -> str | None:
        """Why no image was predicted (every test PNG unreadable, or ``test_dir`` holds none), or None when
        one was or the time budget left images out: the reason ``cellseg predict`` and the kernel report."""
        if any(i not in self.failed for i in self.seconds) or self.skipped:
            return None
        if self.failed:
            first = next(iter(self.failed.values()))
            return f"every one of the {len(self.failed)} test image(s) is unreadable (first: {first})"
        return f"{test_dir} holds no PNG image"


def list_test_ids(paths: CompetitionPaths, log: Log) -> list[str]:
    """Ids of ``test/*.png`` (any letter case of ``.png``, sorted). An empty ``test/`` is logged."""
    if not paths.test_dir.is_dir():
        raise CellsegError(f"{paths.test_dir}: test folder not found (is {paths.root} a competition-layout folder?)")
    ids = list(list_pngs(paths.test_dir))
    if not ids:
        log(f"warning: {paths.test_dir} holds no PNG image")
    return ids


def sample_only_ids(paths: CompetitionPaths, ids: Sequence[str], log: Log) -> list[str]:
    """Ids of ``sample_submission.csv`` that have no PNG among ``ids`` (logged): each gets an empty
    row, so the submission always lists every id the scorer expects."""
    if not paths.sample_submission.is_file():
        return []
    try:
        sample = read_sample_submission(paths.sample_submission)
    except CellsegError as e:
        log(f"warning: {e}")
        return []
    have = set(ids)
    missing = list(dict.fromkeys(i for i in sample if i not in have))
    if missing:
        log(
            f"warning: {len(missing)} id(s) of {paths.sample_submission.name} have no PNG in test/ "
            f"(e.g. {missing[0]}); they get an empty row"
        )
    return missing


# ----------------------------------------------------------------------------- the time budget

#: margin on measured seconds per unit when planning against the time budget
SAFETY = 1.3
#: dropped views / models come back when the larger plan fits this fraction of the time left
REGROW_MARGIN = 0.85


@dataclass
class Calibration:
    """The time budget's first measurement: one model x the identity view of one test image."""

    seconds: float  # warm: the second forward + its vote and pasting its masks
    cold_seconds: float  # the first forward (warm-up), not used for planning
    image_id: str
    raw: list[RawView]  # the timed forward's RawViews, used for that image


class BudgetController:
    """Decides before every image which views x models fit the time left, on an injected clock.

    Without a budget it keeps every view and model and never stops the run.

    Args:
        budget: seconds for the whole run, counted from ``start`` (None: no budget).
        views: the manifest's TTA views, in the order they are dropped last-first.
        weights: each model's ensemble weight (the lowest goes first).
        start: ``clock()`` when the run started.
        clock: seconds, never going back (``time.monotonic``).
        log: receives every change of plan.
    """

    def __init__(
        self, budget: float | None, views: Sequence[str], weights: Sequence[float], start: float, clock: Clock, log: Log
    ):
        self.budget = budget
        self.all_views, self.weights = list(views), list(weights)
        self.all_models = list(range(len(weights)))
        self.views, self.models = list(self.all_views), list(self.all_models)
        self.start, self.clock, self.log = start, clock, log
        self.reserve = min(2.0, 0.05 * (budget or 0)) + 0.01 * (budget or 0)  # writing + validating the CSV
        self.unit_times: list[float] = []  # measured seconds per model x view of one image
        self.decisions: list[str] = []

    def seconds_left(self) -> float:
        """Seconds left before the reserve for writing the submission (inf without a budget)."""
        if self.budget is None:
            return float("inf")
        return self.budget - self.reserve - (self.clock() - self.start)

    def wants_calibration(self) -> bool:
        return self.budget is not None and self.seconds_left() > 0

    def calibrated(self, calib: Calibration) -> None:
        self.unit_times.append(calib.seconds)
        self.log(
            f"time budget {self.budget:.0f}s: one model x one view takes ~{calib.seconds:.2f}s per image "
            f"(first, cold forward: {calib.cold_seconds:.2f}s)"
        )

    def measured(self, seconds: float) -> None:
        """One image took ``seconds`` (throughput) with the current views x models."""
        self.unit_times.append(seconds / max(len(self.views) * len(self.models), 1))

    def forget(self) -> None:
        """Drop the measurements (they belong to another device)."""
        self.unit_times.clear()

    def per_unit(self) -> float | None:
        return SAFETY * float(np.median(self.unit_times[-5:])) if self.unit_times else None

    def admit(self, images_left: int, in_flight: int) -> bool:
        """Plan the views x models for the next image; False when no time is left for it.

        Args:
            images_left: images not yet started, the next one included.
            in_flight: images started whose CPU half is still running.
        """
        if self.budget is None:
            return True
        seconds_left, per_unit = self.seconds_left(), self.per_unit()
        if per_unit is not None:
            self._replan(per_unit, images_left + in_flight, seconds_left)
        est = (per_unit or 0.0) * len(self.views) * len(self.models) * (1 + in_flight)
        if seconds_left > 0 and est <= seconds_left:
            return True
        msg = (
            f"time budget: {self.budget:.0f}s nearly spent after {self.clock() - self.start:.0f}s; "
            f"{images_left} image(s) left with empty rows"
        )
        self.log(msg)
        self.decisions.append(msg)
        return False

    def _replan(self, per_unit: float, n_left: int, seconds_left: float) -> None:
        """Plan from the full lists, so dropped views and models come back; growing back needs a margin
        (no flip-flop). Logs and records the plan's lines when it changes."""
        units = len(self.views) * len(self.models)
        plan = plan_within_budget(self.all_views, self.all_models, self.weights, per_unit, n_left, seconds_left)
        if len(plan.views) * len(plan.models) > units:
            margin = REGROW_MARGIN * seconds_left
            plan = plan_within_budget(self.all_views, self.all_models, self.weights, per_unit, n_left, margin)
            if len(plan.views) * len(plan.models) > units:
                plan.decisions = [
                    f"time budget: {n_left} images projected at "
                    f"{n_left * per_unit * len(plan.views) * len(plan.models):.0f}s fit the "
                    f"{seconds_left:.0f}s left: back to views {plan.views} x models {plan.models}"
                ]
            else:
                plan = BudgetPlan(self.views, self.models)
        if (plan.views, plan.models) != (self.views, self.models):
            for d in plan.decisions:
                self.log(d)
            self.decisions += plan.decisions
        self.views, self.models = plan.views, plan.models


# ----------------------------------------------------------------------------- CPU / device overlap


class Overlap:
    """Runs the CPU half of image k in a worker thread while the caller runs the device half of
    image k + 1 (``threaded``), or at once in the caller's thread; results come back in order.

    Use as a context manager: leaving it waits for the worker.
    """

    def __init__(self, threaded: bool):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellseg-post") if threaded else None
        self._pending: deque[tuple[Any, Future]] = deque()

    def __len__(self) -> int:
        """Jobs submitted and not yet handed back."""
        return len(self._pending)

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> list[tuple[Any, Future]]:
        """Start ``fn(*args)``; returns the (tag, future) pairs to collect now, oldest first: all but
        the newest when threaded, else this one, finished (an exception is kept in its future)."""
        if self._pool is not None:
            fut = self._pool.submit(fn, *args)
        else:
            fut = Future()
            try:
                fut.set_result(fn(*args))
            except Exception as e:
                fut.set_exception(e)
        self._pending.append((tag, fut))
        keep = 1 if self._pool is not None else 0
        return [self._pending.popleft() for _ in range(len(self._pending) - keep)]

    def drain(self) -> list[tuple[Any, Future]]:
        """Every job still pending, oldest first."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- a folder


_CUDA_WORDS = re.compile(r"\bcu(da|dnn|blas)\b|CUDA|NVIDIA driver", re.IGNORECASE)


def is_cuda_error(e: BaseException) -> bool:
    """Whether ``e`` says the CUDA device failed (torch's CUDA error types, or a RuntimeError naming
    CUDA / cuDNN / cuBLAS), as opposed to a problem of the image or the code."""
    kinds = tuple(k for k in (getattr(torch.cuda, "CudaError", None), getattr(torch, "AcceleratorError", None)) if k)
    if isinstance(e, (*kinds, OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and bool(_CUDA_WORDS.search(str(e)))


def failure_reason(e: BaseException) -> str:
    """One line for a failed image: a CellsegError's message, else the exception's type, first line and
    the place it was raised."""
    if isinstance(e, CellsegError):
        return str(e)
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" + (f" ({Path(where.filename).name}:{where.lineno})" if where else "")


def finish_and_encode(ensemble: Ensemble, shape: tuple[int, int], raw: list[RawView]) -> tuple[ImageResult, list[str]]:
    """The CPU half of one image: :meth:`Ensemble.finish`, then each instance's RLE."""
    res = ensemble.finish(shape, raw)
    return res, [encode_crop(c, *shape) for c in res.crops]


class FolderRun:
    """One folder's images through one ensemble, image by image, under a time budget.

    Args:
        paths: the competition-layout folder.
        ids: the test ids, in order.
        ensemble: every model of the manifest, loaded.
        budget: decides the views x models of every image (and when to stop).
        result: filled in as images finish.
        clock: the budget's clock (per-image seconds are measured on it).
        log: one line per failure, change of plan or change of device.
    """

    def __init__(
        self,
        paths: CompetitionPaths,
        ids: Sequence[str],
        ensemble: Ensemble,
        budget: BudgetController,
        result: RunResult,
        clock: Clock,
        log: Log,
    ):
        self.paths, self.ids, self.ensemble = paths, list(ids), ensemble
        self.budget, self.result, self.clock, self.log = budget, result, clock, log
        self.calib: Calibration | None = None

    # ---- failures

    def fail(self, image_id: str, e: BaseException) -> None:
        """``image_id`` gets an empty row; the run goes on (one bad image must not sink the submission)."""
        reason = failure_reason(e)
        how = "" if isinstance(e, CellsegError) else "failed with "
        self.log(f"{image_id}: {how}{reason}; writing an empty row")
        self.result.rows[image_id] = []
        self.result.failed[image_id] = reason

    def fall_back_to_cpu(self, e: BaseException) -> bool:
        """After a CUDA error on a CUDA ensemble: load the models again on the CPU (True); else False."""
        if self.ensemble.device.type != "cuda" or not is_cuda_error(e):
            return False
        self.log(
            f"WARNING: CUDA failed on {self.ensemble.device} ({failure_reason(e)}); FALLING BACK TO THE CPU "
            "for the rest of the run: inference will be much slower"
        )
        cpu = torch.device("cpu")
        self.ensemble = Ensemble.load(self.ensemble.manifest, cpu)
        self.result.device = str(cpu)
        self.budget.forget()
        return True

    # ---- calibration

    def calibrate(self) -> None:
        """Time one model x the identity view on the first readable test image (of the first five);
        a failure costs at most that image (see the module docstring)."""
        for image_id in self.ids[:5]:
            try:
                image = read_gray(self.paths.image("test", image_id))
            except CellsegError:
                continue  # the main loop reports it
            try:
                self.calib = self._calibrate_retried(image_id, image)
            except Exception as e:
                self.fail(image_id, e)
                continue
            self.budget.calibrated(self.calib)
            return

    def _calibrate_retried(self, image_id: str, image: np.ndarray) -> Calibration:
        """:meth:`_calibrate_once`, tried once more after a failure (on the CPU after a CUDA error)."""
        try:
            return self._calibrate_once(image_id, image)
        except Exception as e:
            if not self.fall_back_to_cpu(e):
                self.log(f"{image_id}: time budget calibration failed ({failure_reason(e)}); trying once more")
        return self._calibrate_once(image_id, image)

    def _calibrate_once(self, image_id: str, image: np.ndarray) -> Calibration:
        one = self.ensemble.select(["identity"], [0])
        t0 = self.clock()
        one.forward(image)  # results come back on the CPU: waited for
        cold = self.clock() - t0
        t0 = self.clock()
        raw = one.forward(image)
        one.detections(image.shape, raw, min_score=0.5)  # the vote and the pasting of its masks
        return Calibration(self.clock() - t0, cold, image_id, raw)

    # ---- the images

    def run(self, overlap: Overlap, bar: tqdm) -> None:
        """Every image not yet failed, in order, until the budget says stop."""
        last = self.clock()
        for k, image_id in enumerate(self.ids):
            if image_id in self.result.failed:  # its calibration failed
                continue
            if not self.budget.admit(len(self.ids) - k, len(overlap)):
                self.result.skipped = self.ids[k:]
                break
            for tag, fut in self.start_image(image_id, overlap):
                self.collect(tag, fut)
            now = self.clock()
            if image_id not in self.result.failed:
                self.result.seconds[image_id] = now - last  # throughput: one image per this many seconds
                self.budget.measured(now - last)
            last = now
            bar.update()
        for tag, fut in overlap.drain():
            self.collect(tag, fut)

    def start_image(self, image_id: str, overlap: Overlap) -> list[tuple[Any, Future]]:
        """Read and forward one image, hand its CPU half to ``overlap``; returns what ``overlap`` hands back."""
        ens = self.ensemble.select(self.budget.views, self.budget.models)
        try:
            image = read_gray(self.paths.image("test", image_id))
            t0 = self.clock()
            try:
                raw = ens.forward(image, self.known(image_id, ens))
            except Exception as e:
                if not self.fall_back_to_cpu(e):
                    raise
                ens = self.ensemble.select(self.budget.views, self.budget.models)
                raw = ens.forward(image)
            forward_s = self.clock() - t0
        except Exception as e:
            self.fail(image_id, e)
            return []
        return overlap.submit((image_id, forward_s), finish_and_encode, ens, image.shape, raw)

    def known(self, image_id: str, ens: Ensemble) -> dict[tuple[int, str], RawView]:
        """The calibration forward's output, for its own image when the plan still runs it."""
        c = self.calib
        if c is None or image_id != c.image_id or 0 not in self.budget.models or "identity" not in ens.views:
            return {}
        return {(self.budget.models.index(0), "identity"): c.raw[0]}

    def collect(self, tag: tuple[str, float], fut: Future) -> None:
        """One image's CPU half: its rows, or its failure."""
        image_id, forward_s = tag
        try:
            res, rows = fut.result()
        except Exception as e:
            self.fail(image_id, e)
            return
        self.result.rows[image_id] = rows
        self.result.cell_types[image_id] = res.cell_type
        self.result.forward_s += forward_s
        self.result.rest_s += res.rest_s


def _image_ids(paths: CompetitionPaths, image_ids: Sequence[str] | None, log: Log) -> tuple[list[str], list[str]]:
    """(ids to predict, sample-submission ids without a PNG); raises CellsegError when there is nothing to do."""
    ids = list(image_ids) if image_ids is not None else list_test_ids(paths, log)
    if image_ids is not None and not paths.test_dir.is_dir():
        raise CellsegError(f"{paths.test_dir}: test folder not found")
    sample_ids = sample_only_ids(paths, ids, log) if image_ids is None else []
    if image_ids is None and not ids and not sample_ids:
        raise CellsegError(
            f"{paths.test_dir} holds no PNG and {paths.sample_submission.name} lists no id: nothing to predict"
        )
    return ids, sample_ids


def _load(manifest: Manifest, device: str, log: Log) -> Ensemble:
    return Ensemble.load(manifest, resolve_device(device, log=log))


def predict_folder(
    data_dir: str | Path,
    manifest_path: str | Path,
    out: str | Path,
    time_budget: str | float | None = None,
    device: str = "auto",
    progress: bool = True,
    log: Log | None = None,
    image_ids: Sequence[str] | None = None,
    validate: bool = True,
    pipeline: bool | None = None,
    kind: str = "test",
    clock: Clock = time.monotonic,
) -> RunResult:
    """Predict every test image of ``data_dir`` with the manifest's ensemble into ``out``.

    ``image_ids`` restricts the run (default: every ``test/*.png``, plus an empty row for each
    ``sample_submission.csv`` id without a PNG). ``pipeline``: post-process image k in a worker
    thread while the models run on image k + 1 (default: on CUDA only). ``clock`` times the budget.
    Raises CellsegError (one line) before any model loads for an unwritable ``out``, a missing test
    folder, an unusable manifest or a checksum mismatch, and after writing for an invalid submission.
    A failed image gets an empty row: even when every image fails, a valid submission is written
    (``result.failed`` then lists every id; callers decide how loudly to say so). ``kind`` names the
    images in log lines (the dry run stages train images as ``test/``).
    """
    start = clock()
    log = log or _default_log
    budget_s = parse_duration(time_budget)
    check_writable(out, "file")
    paths = CompetitionPaths(Path(data_dir))
    ids, sample_ids = _image_ids(paths, image_ids, log)
    manifest = load_manifest(manifest_path, verify=True)  # checksums before any image is touched
    ensemble = _load(manifest, device, log)
    load_s = clock() - start
    log(
        f"loaded {len(ensemble.models)} model(s) on {ensemble.device} in {load_s:.1f}s; views {manifest.tta}; "
        f"{len(ids)} {kind} image(s); ensemble: {summarize(manifest)}"
    )
    result = RunResult(Path(out), {i: [] for i in ids}, {}, {}, {}, [], [], load_s, 0.0, str(ensemble.device))
    budget = BudgetController(budget_s, manifest.tta, [m.weight for m in ensemble.models], start, clock, log)
    run = FolderRun(paths, ids, ensemble, budget, result, clock, log)
    if ids and budget.wants_calibration():
        run.calibrate()
    threaded = ensemble.device.type == "cuda" if pipeline is None else pipeline
    bar = tqdm(total=len(ids), unit="img", disable=None if progress else True, desc="predict", dynamic_ncols=True)
    with Overlap(threaded) as overlap:
        run.run(overlap, bar)
    bar.close()
    result.views, result.models, result.decisions = budget.views, len(budget.models), budget.decisions
    _write(result, paths, sample_ids, validate and image_ids is None, log)
    result.total_s = clock() - start
    log(
        f"wrote {out}: {len(ids)} image(s), {sum(map(len, result.rows.values()))} instance(s), "
        f"{len(result.failed)} failed, {len(result.skipped)} skipped, {result.total_s:.1f}s"
    )
    return result


def _write(result: RunResult, paths: CompetitionPaths, sample_ids: Sequence[str], validate: bool, log: Log) -> None:
    """Write (and with ``validate`` check) the submission: every row, an empty one per sample-only id."""
    if result.rows and len(result.failed) == len(result.rows):
        first = next(iter(result.failed.values()))
        log(f"WARNING: every test image failed ({len(result.rows)}); first: {first}; every row is empty")
    for i in sample_ids:
        result.rows.setdefault(i, [])
    write_submission(result.out, result.rows)
    problems = validate_submission(result.out, paths.test_dir, sample_ids) if validate else []
    if problems:
        raise CellsegError(
            f"{result.out}: written submission is invalid ({len(problems)} problem(s)); first: {problems[0]}"
        )
