"""Predict a competition-layout folder's ``test/`` into ``submission.csv``: the kernel's pipeline.

    result = predict_folder("data/", "weights/demo/manifest.yaml", "submission.csv", time_budget="8h30m")

Order of work: manifest loaded and every checksum verified, models loaded, then for each test image:
read (odd images converted by cellseg.io.read_gray; unreadable ones logged and given an empty row)
-> :func:`cellseg.inference.pipeline.forward_image` + :func:`~cellseg.inference.pipeline.finish_image`
-> RLE. The submission is written atomically with every test id (and an empty row for each
``sample_submission.csv`` id without a PNG) and validated before returning; it is written even when
every image is unreadable or ``test/`` is empty. ``out`` is checked writable before anything loads.

Time budget: one model x the identity view is first run twice on the first test image, a warm-up
(on a GPU the first forward includes cuDNN start-up and lazy kernel loading, seconds that later
forwards do not pay) and a timed run whose output that image then uses. Before every image the
remaining work is projected from the measured seconds per (model x view) unit (median of the last
five) and planned afresh from the manifest's full view and model lists: while it would not fit, TTA
views are dropped (last listed first), then models (lowest weight first), and they come back as
soon as the time left allows; every change of plan is logged. If even one model x one view does
not fit, images are processed while time remains and the rest get empty rows: the run never overruns.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cellseg.config.loader import parse_duration
from cellseg.config.manifest import load_manifest
from cellseg.data.rle import encode_crop
from cellseg.data.submission import validate_submission, write_submission
from cellseg.data.truth import read_sample_submission
from cellseg.errors import CellsegError
from cellseg.inference.device import resolve_device
from cellseg.inference.forward import (
    LoadedModel,
    RawView,
    load_ensemble,
    predict_views,
    raw_to_detections,
)
from cellseg.inference.pipeline import finish_image, forward_image
from cellseg.io import check_writable, list_pngs, read_gray
from cellseg.model.provenance import summarize
from cellseg.paths import CompetitionPaths

Log = Callable[[str], None]


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
    out: Path
    rows: dict[str, list[str]]
    cell_types: dict[str, str]
    seconds: dict[str, float]  # per processed image
    failed: dict[str, str]  # id -> reason
    skipped: list[str]  # ids left empty for the time budget
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


#: margin on measured seconds per unit when planning against the time budget
SAFETY = 1.3
#: dropped views / models come back when the larger plan fits this fraction of the time left
REGROW_MARGIN = 0.85


@dataclass
class Calibration:
    """The time budget's first measurement: one model x the identity view of one test image."""

    seconds: float  # warm: the second forward + pasting its masks
    cold_seconds: float  # the first forward (warm-up), not used for planning
    image_id: str
    raw: list[RawView]  # the timed forward's RawViews, used for that image


def _calibrate(
    paths: CompetitionPaths, ids: Sequence[str], one_model: Sequence[LoadedModel], device: torch.device
) -> Calibration | None:
    """Time one model x identity view on the first readable test image, after a warm-up forward on the
    same image (None if none of the first five reads)."""
    for image_id in ids[:5]:
        try:
            image = read_gray(paths.image("test", image_id))
        except CellsegError:
            continue
        t0 = time.monotonic()
        predict_views(one_model, image, ["identity"], device)  # results come back on the CPU: waited for
        cold = time.monotonic() - t0
        t0 = time.monotonic()
        raw = predict_views(one_model, image, ["identity"], device)
        h, w = image.shape  # read_gray: always (H, W)
        raw_to_detections(raw, one_model, h, w, min_score=0.5)
        return Calibration(time.monotonic() - t0, cold, image_id, raw)
    return None


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
) -> RunResult:
    """Predict every test image of ``data_dir`` with the manifest's ensemble into ``out``.

    ``image_ids`` restricts the run (default: every ``test/*.png``, plus an empty row for each
    ``sample_submission.csv`` id without a PNG). ``pipeline``: post-process image k in a worker
    thread while the models run on image k + 1 (default: on CUDA only).
    Raises CellsegError (one line) before any model loads for an unwritable ``out``, a missing test
    folder, an unusable manifest or a checksum mismatch, and after writing for an invalid submission.
    Unreadable images get empty rows: even when every image fails, a valid submission is written
    (``result.failed`` then lists every id; callers decide how loudly to say so). ``kind`` names the
    images in log lines (the dry run stages train images as ``test/``).
    """
    start = time.monotonic()
    log = log or _default_log
    budget = parse_duration(time_budget)
    check_writable(out, "file")
    paths = CompetitionPaths(Path(data_dir))
    ids = list(image_ids) if image_ids is not None else list_test_ids(paths, log)
    if image_ids is not None and not paths.test_dir.is_dir():
        raise CellsegError(f"{paths.test_dir}: test folder not found")
    sample_ids = sample_only_ids(paths, ids, log) if image_ids is None else []
    if image_ids is None and not ids and not sample_ids:
        raise CellsegError(
            f"{paths.test_dir} holds no PNG and {paths.sample_submission.name} lists no id: nothing to predict"
        )
    manifest = load_manifest(manifest_path, verify=True)  # checksums before any image is touched

    dev = resolve_device(device, log=log)
    loaded_all = load_ensemble(manifest, dev)
    load_s = time.monotonic() - start
    log(
        f"loaded {len(loaded_all)} model(s) on {dev} in {load_s:.1f}s; views {manifest.tta}; {len(ids)} {kind} image(s); "
        f"ensemble: {summarize(manifest)}"
    )

    all_views: list[str] = list(manifest.tta)
    all_models = list(range(len(loaded_all)))
    views, model_idx = all_views, all_models
    weights = [m.weight for m in loaded_all]
    rows: dict[str, list[str]] = {i: [] for i in ids}
    result = RunResult(Path(out), rows, {}, {}, {}, [], [], load_s, 0.0, str(dev))
    unit_times: list[float] = []
    reserve = min(2.0, 0.05 * (budget or 0)) + 0.01 * (budget or 0)  # writing + validating the CSV
    calib: Calibration | None = None
    if budget is not None and ids and time.monotonic() - start < budget - reserve:
        calib = _calibrate(paths, ids, loaded_all[:1], dev)
        if calib is not None:
            unit_times.append(calib.seconds)
            log(
                f"time budget {budget:.0f}s: one model x one view takes ~{calib.seconds:.2f}s per image "
                f"(first, cold forward: {calib.cold_seconds:.2f}s)"
            )
    # On CUDA the CPU stages of image k run in a worker thread while the GPU runs image k + 1.
    use_thread = dev.type == "cuda" if pipeline is None else pipeline
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellseg-post") if use_thread else None
    pending: list[tuple[str, Future, float, tuple[int, int]]] = []

    def fail(image_id: str, e: BaseException) -> None:
        if isinstance(e, CellsegError):
            reason = str(e)
            log(f"{image_id}: {reason}; writing an empty row")
        else:  # keep going: one bad image must not sink the submission
            where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            first = str(e).splitlines()[0] if str(e) else ""
            reason = f"{type(e).__name__}: {first}" + (
                f" ({Path(where.filename).name}:{where.lineno})" if where else ""
            )
            log(f"{image_id}: failed with {reason}; writing an empty row")
        result.failed[image_id] = reason

    def collect() -> None:
        image_id, fut, forward_s, shape = pending.pop(0)
        try:
            res = fut.result()
        except Exception as e:
            fail(image_id, e)
            return
        rows[image_id] = [encode_crop(c, *shape) for c in res.crops]
        result.cell_types[image_id] = res.cell_type
        result.forward_s += forward_s
        result.rest_s += res.rest_s

    bar = tqdm(ids, unit="img", disable=None if progress else True, desc="predict", dynamic_ncols=True)
    last = time.monotonic()
    try:
        for k, image_id in enumerate(bar):
            left = len(ids) - k
            if budget is not None:
                elapsed = time.monotonic() - start
                seconds_left = budget - reserve - elapsed
                per_unit = SAFETY * float(np.median(unit_times[-5:])) if unit_times else None
                if per_unit is not None:  # from the full lists: dropped views and models come back
                    n_left, units = left + len(pending), len(views) * len(model_idx)
                    plan = plan_within_budget(all_views, all_models, weights, per_unit, n_left, seconds_left)
                    if len(plan.views) * len(plan.models) > units:  # growing back only with a margin (no flip-flop)
                        plan = plan_within_budget(
                            all_views, all_models, weights, per_unit, n_left, REGROW_MARGIN * seconds_left
                        )
                        if len(plan.views) * len(plan.models) > units:
                            plan.decisions = [
                                f"time budget: {n_left} images projected at "
                                f"{n_left * per_unit * len(plan.views) * len(plan.models):.0f}s fit the "
                                f"{seconds_left:.0f}s left: back to views {plan.views} x models {plan.models}"
                            ]
                        else:
                            plan = BudgetPlan(views, model_idx)
                    if (plan.views, plan.models) != (views, model_idx):
                        for d in plan.decisions:
                            log(d)
                        result.decisions += plan.decisions
                    views, model_idx = plan.views, plan.models
                est = (per_unit or 0.0) * len(views) * len(model_idx) * (1 + len(pending))
                if seconds_left <= 0 or est > seconds_left:
                    msg = (
                        f"time budget: {budget:.0f}s nearly spent after {elapsed:.0f}s; "
                        f"{left} image(s) left with empty rows"
                    )
                    log(msg)
                    result.decisions.append(msg)
                    result.skipped = ids[k:]
                    break
            path = paths.image("test", image_id)
            loaded = [loaded_all[i] for i in model_idx]
            known = {}  # the calibration forward's output, for its own image
            if calib is not None and image_id == calib.image_id and 0 in model_idx and "identity" in views:
                known = {(model_idx.index(0), "identity"): calib.raw[0]}
            try:
                image = read_gray(path)
                raw, forward_s = forward_image(image, loaded, views, dev, known=known)
            except Exception as e:
                fail(image_id, e)
                last = time.monotonic()
                continue
            if pool is not None:
                fut = pool.submit(finish_image, image.shape, raw, loaded, list(views), manifest)
            else:
                fut = Future()
                try:
                    fut.set_result(finish_image(image.shape, raw, loaded, list(views), manifest))
                except Exception as e:
                    fut.set_exception(e)
            pending.append((image_id, fut, forward_s, image.shape))
            while len(pending) > (1 if pool is not None else 0):
                collect()
            now = time.monotonic()
            result.seconds[image_id] = now - last  # throughput: one image per this many seconds
            last = now
            unit_times.append(result.seconds[image_id] / max(len(views) * len(model_idx), 1))
            rate = len(result.seconds) / max(sum(result.seconds.values()), 1e-9)
            finish = time.strftime("%H:%M:%S", time.localtime(time.time() + (left - 1) / rate))
            bar.set_postfix_str(f"{rate:.2f} img/s, finish ~{finish}", refresh=False)
        while pending:
            collect()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    bar.close()
    result.views, result.models = views, len(model_idx)
    if ids and len(result.failed) == len(ids):
        first = next(iter(result.failed.values()))
        log(f"WARNING: every test image failed ({len(ids)}); first: {first}; every row is empty")
    for i in sample_ids:
        rows.setdefault(i, [])
    write_submission(out, rows)
    if validate:
        problems = validate_submission(out, paths.test_dir, sample_ids) if image_ids is None else []
        if problems:
            raise CellsegError(
                f"{out}: written submission is invalid ({len(problems)} problem(s)); first: {problems[0]}"
            )
    result.total_s = time.monotonic() - start
    n_cells = sum(len(r) for r in rows.values())
    log(
        f"wrote {out}: {len(ids)} image(s), {n_cells} instance(s), {len(result.failed)} failed, "
        f"{len(result.skipped)} skipped, {result.total_s:.1f}s"
    )
    return result
