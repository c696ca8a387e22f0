"""What ``cellseg tune`` writes back, and why: the write rule, grid-edge warnings, the report.

The write rule. A class's thresholds change only when the out-of-fold score of the tuned choice
(thresholds chosen without the image's sample-group fold, :func:`cellseg.tuning.tune.tune`) beats the
current manifest's score on the same images by at least ``min_gain``. The in-sample tuned score
never decides: it is the maximum of a search over thousands of combinations and rises above the
current score by chance alone. A class whose images all come from one sample group has no
out-of-fold figure, so its thresholds stay. The manifest is written when at least one class
changes; ``force`` writes every tuned class regardless (and writes even when none changed).

    res = tune(cache, truth, manifest)
    decision = decide(res, min_gain=0.003)
    print(report(res, decision))
    if decision.write:
        write_tuned_manifest(path, manifest, decision.classes)
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cellseg.config.manifest import ClassThresholds, Manifest, write_manifest
from cellseg.tuning.tune import TuneGrid, TuneResult

#: default margin by which the out-of-fold score must beat the current thresholds (`tune --min-gain`)
MIN_GAIN = 0.003
#: the thresholds tuned, in the order of the report and the CLI flags
NAMES = ("score", "mask_threshold", "nms_iou", "min_pixels")


@dataclass
class Decision:
    """The outcome of :func:`decide`.

    Attributes:
        classes: cell type -> the thresholds to write (the current ones where kept).
        changed: cell types whose thresholds change.
        reasons: cell type -> one line saying what changes and why, or why not.
        write: whether the manifest is to be written.
        min_gain: the margin used.
    """

    classes: dict[str, ClassThresholds]
    changed: list[str]
    reasons: dict[str, str]
    write: bool
    min_gain: float


def _diff(old: ClassThresholds, new: ClassThresholds) -> str:
    """``score 0.500 -> 0.275, min_pixels 0 -> 150``."""

    def fmt(name: str, v: float) -> str:
        return str(int(v)) if name == "min_pixels" else f"{v:.3g}"

    return ", ".join(
        f"{n} {fmt(n, getattr(old, n))} -> {fmt(n, getattr(new, n))}"
        for n in NAMES
        if getattr(old, n) != getattr(new, n)
    )


def decide(res: TuneResult, min_gain: float = MIN_GAIN, force: bool = False) -> Decision:
    """Apply the write rule (module docstring) to every class of ``res``."""
    classes, changed, reasons = {}, [], {}
    for ct, r in res.classes.items():
        classes[ct] = r.default
        if r.tuned == r.default:
            reasons[ct] = f"kept: the current thresholds score best on these images ({r.default_score:.4f})"
            continue
        what = _diff(r.default, r.tuned)
        if r.out_of_fold_score is None:
            why = (
                f"its {r.images} image(s) come from one sample group, so no out-of-fold figure exists to "
                f"check the in-sample gain ({r.tuned_score - r.default_score:+.4f})"
            )
            ok = False
        else:
            gain = r.out_of_fold_score - r.default_score
            ok = gain >= min_gain
            why = (
                f"out-of-fold {r.out_of_fold_score:.4f} vs current {r.default_score:.4f} "
                f"({gain:+.4f} {'>=' if ok else '<'} margin {min_gain:g})"
            )
        if ok or force:
            classes[ct] = r.tuned
            changed.append(ct)
            reasons[ct] = f"changed ({what}): {why}" + ("" if ok else " [--force]")
        else:
            reasons[ct] = f"kept (tuning proposed {what}): {why}"
    return Decision(classes, changed, reasons, bool(changed) or force, min_gain)


@dataclass(frozen=True)
class GridEdge:
    """A tuned threshold chosen at the edge of its grid while the score still rises towards it.

    Attributes:
        cell_type, name: the class and the threshold (one of :data:`NAMES`).
        chosen: the value chosen, the smallest or largest one tried (``largest`` says which).
        beyond: up to two values one and two grid steps past it, inside the threshold's range.
        neighbour: the grid value next to ``chosen``.
    """

    cell_type: str
    name: str
    chosen: float
    largest: bool
    beyond: tuple[float, ...]
    neighbour: float

    def warning(self) -> str:
        """One line naming the edge and a flag value that extends the grid past it."""
        values = sorted({self.neighbour, self.chosen, *self.beyond})
        flag = "--" + self.name.replace("_", "-")
        return (
            f"warning: {self.cell_type} {self.name} = {self.chosen:g} is the "
            f"{'largest' if self.largest else 'smallest'} value tried and the score still rises towards it: "
            f"extend the grid, e.g. {flag} {','.join(f'{v:g}' for v in values)} (or --extend-grid N)"
        )


def grid_edges(res: TuneResult) -> list[GridEdge]:
    """Every tuned threshold chosen at the edge of its grid while the score still rises towards that
    edge (a better value may lie outside), with the values one and two steps past it. An edge at the
    natural bound of its value (min_pixels 0, a score of 1) is not one."""
    out = []
    for ct, r in res.classes.items():
        for name in NAMES:
            xs, ys = r.curves[name]
            if len(xs) < 2:
                continue
            chosen = getattr(r.tuned, name)
            i = xs.index(chosen)
            if i not in (0, len(xs) - 1):
                continue
            j = 1 if i == 0 else len(xs) - 2
            if ys[i] <= ys[j] + 1e-9:
                continue
            step = abs(xs[j] - xs[i])
            sign = -1 if i == 0 else 1
            ext = [chosen + sign * step * m for m in (1, 2)]
            if name == "min_pixels":
                ext = [int(round(v)) for v in ext if v >= 0]
            else:
                ext = [round(v, 3) for v in ext if 0 < v < 1]
            if ext:
                out.append(GridEdge(ct, name, chosen, i != 0, tuple(ext), xs[j]))
    return out


def grid_edge_warnings(res: TuneResult) -> list[str]:
    """One line per :func:`grid_edges` edge, with a flag value that extends the grid."""
    return [e.warning() for e in grid_edges(res)]


def extended_grid(grid: TuneGrid, edges: list[GridEdge]) -> TuneGrid | None:
    """``grid`` with every edge's values past it added (one grid for all classes, as tune searches
    one), or None when ``edges`` add no value the grid does not hold already."""
    values = {n: list(getattr(grid, n)) for n in NAMES}
    for e in edges:
        values[e.name] = sorted(set(values[e.name]) | set(e.beyond))
    if all(set(values[n]) == set(getattr(grid, n)) for n in NAMES):
        return None
    return TuneGrid(**values).check()


def _score(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "n/a"


def report_table(res: TuneResult) -> str:
    """The per-class table: images (grouped by true type), sample groups, current / tuned in-sample /
    out-of-fold scores and the tuned values. ``n/a``: no out-of-fold figure (one sample group)."""
    lines = [
        f"{'cell type':<9} {'images':>6} {'groups':>6} {'current':>8} {'tuned':>8} {'out-of-fold':>11}   "
        "tuned (score / mask / nms / min px)"
    ]
    for ct, r in res.classes.items():
        t = r.tuned
        lines.append(
            f"{ct:<9} {r.images:>6} {r.groups:>6} {r.default_score:>8.4f} {r.tuned_score:>8.4f} "
            f"{_score(r.out_of_fold_score):>11}   "
            f"{t.score:.3f} / {t.mask_threshold:.2f} / {t.nms_iou:.2f} / {t.min_pixels}"
        )
    groups = sum(r.groups for r in res.classes.values())
    lines.append(
        f"{'overall':<9} {res.images:>6} {groups:>6} {res.default_score:>8.4f} {res.tuned_score:>8.4f} "
        f"{_score(res.out_of_fold_score):>11}"
    )
    return "\n".join(lines)


def report(res: TuneResult, decision: Decision) -> str:
    """The full report: the table, what the columns mean, the cell-type vote, a line per class
    saying what changes and why, and the grid-edge warnings."""
    lines = [report_table(res)]
    lines.append(
        "(rows grouped by true cell type; current = the manifest's thresholds; tuned = best on these images, "
        "in-sample; out-of-fold = thresholds chosen without the image's sample-group fold)"
    )
    single = [ct for ct, r in res.classes.items() if r.out_of_fold_score is None]
    if single:
        lines.append(f"n/a: {', '.join(single)} has images from one sample group only: no out-of-fold figure can exist")
    wrong = {ct: len(r.misvoted) for ct, r in res.classes.items() if r.misvoted}
    lines.append(
        f"cell-type vote: {res.vote_right}/{res.images} image(s) voted their true type "
        f"({res.vote_right / max(res.images, 1):.0%})"
        + (
            "; misvoted: " + ", ".join(f"{ct} {n}" for ct, n in wrong.items()) + " (the kernel applies the voted type)"
            if wrong
            else ""
        )
    )
    for ct in res.classes:
        lines.append(f"{ct}: {decision.reasons[ct]}")
    lines += grid_edge_warnings(res)
    return "\n".join(lines)


def write_tuned_manifest(
    manifest_path: str | Path, manifest: Manifest, classes: Mapping[str, ClassThresholds]
) -> tuple[Path, Path]:
    """Keep the current manifest as ``manifest.vN.yaml`` (first free N) and write ``classes`` (cell
    type -> thresholds; types not given keep theirs) into the manifest.

    Returns (new manifest path, kept old version path).
    """
    path = Path(manifest_path)
    if path.is_dir():
        path = path / "manifest.yaml"
    n = 1
    while (old := path.with_name(f"{path.stem}.v{n}{path.suffix}")).exists():
        n += 1
    shutil.copy2(path, old)
    merged = {**manifest.classes, **classes}
    write_manifest(dataclasses.replace(manifest, classes=merged), path, fill_checksums=False)
    return path, old
