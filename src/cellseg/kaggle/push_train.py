"""Train on Kaggle's GPU from the command line, and bring the checkpoints back (``push.py train`` / ``fetch``).

    python tools/push.py train --config configs/maskrcnn_r50_fpn.yaml --fold all --init coco.pth --wait
    python tools/push.py train --config configs/maskrcnn_r50_fpn.yaml --fold 3 --resume-from OWNER/sartorius-cellseg-train
    python tools/push.py fetch --kernel OWNER/sartorius-cellseg-train --fold all --out runs/kaggle/r50

train  1. (local, no network) load the config with the overrides, add ``train.time_limit=11h30m``
          unless it is set, check ``--accelerator`` (default NvidiaTeslaT4: 2 x T4), stage the
          training bundle (``cellseg.kaggle.training``: wheel + config + ``--init`` weights + marker),
          check the dataset and every fold's kernel metadata, and print the plan: kernels x time
          limit = GPU-hours at most, and the expected hours (``--sec-per-step``, else an estimate);
       2. read the weekly GPU quota (``quota_view``): a plan over the hours left is refused (exit 2)
          unless ``--ignore-quota``; an unreadable quota only warns. Nothing is uploaded before this;
       3. with ``--resume-from``: find the latest session of each fold (``<slug>-fold{K}``, then
          ``-fold{K}-s2``, ...) and check that its output holds a training output of the same fold
          (its ``cellseg-train-output.json``); the fold is pushed as the next session
          (``-fold{K}-s{N+1}``) with that kernel as its source: no kernel is its own source;
       4. upload the bundle as a version of ``{username}/sartorius-cellseg-train-bundle`` (as
          ``push.py dataset`` does) and wait until it is ready;
       5. push ``kernel/train.py`` once per fold as ``{username}/<slug>-fold{K}`` (GPU on, internet off,
          private, ``machine_shape`` = the accelerator; sources: the competition, the bundle, and the
          resumed session), the fold and the bundle id written into the pushed file;
       6. ``--wait``: poll every kernel's pushed version (``owner/slug/VERSION``) until it ends; print
          each one's status (complete / stopped by the time limit / failed) or, on ERROR, its log tail.
fetch  find the latest session of each fold (with ``--fold``), download its output with the client
       into a temporary folder beside ``--out``, verify every file against the kernel's
       ``cellseg-train-output.json`` (size, sha256), then rename it into place: a partial or truncated
       download is never left looking complete. Prints the metrics summary and the ``cellseg export``
       command to run next.

Exit status: 0 ok, 2 bad input / credentials / metadata / over the quota (before anything is
uploaded), 1 Kaggle refused or failed, or a kernel did not complete. The same retry and credential
rules as push.py apply.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from cellseg.config.loader import parse_duration
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, replace_dir, staging
from cellseg.kaggle import budget, kernel_code
from cellseg.kaggle import bundle as bundle_mod
from cellseg.kaggle import metadata as km
from cellseg.kaggle import training as kt
from cellseg.kaggle.client import (
    Kaggle,
    PushError,
    RemoteError,
    UsageError,
    describe,
    http_status,
    report_errors,
    say,
    seconds,
    version_number,
    warn,
)
from cellseg.kaggle.remote import (
    kernel_log_tail,
    kernel_status,
    output_file,
    pinned,
    push_staged_kernel,
    step_dataset,
    upload_names,
)
from cellseg.paths import repo_root

DEFAULT_TIME_LIMIT = "11h30m"
#: What a session without a time limit may use: Kaggle ends a GPU session after 12 h.
SESSION_HOURS = 12.0
ENDED = ("COMPLETE", "ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED")


# ----------------------------------------------------------------------------------------------
# Local preparation (no network)


def train_plan(cfg: Any, folds: list[str], accelerator: str, sec_per_step: float | None) -> budget.Plan:
    """The GPU time of training ``folds`` of ``cfg`` on ``accelerator`` (one kernel per fold)."""
    tc, dc = cfg.train, cfg.data
    fold = folds[0]
    images = budget.images_per_epoch(dc.use_train, bool(dc.livecell), list(dc.livecell_splits), dc.folds, fold)
    n_steps = budget.steps(images, tc.epochs, tc.batch_size, budget.gpus_of(accelerator), tc.max_steps)
    if dc.livecell_val:
        held_out = budget.LIVECELL_IMAGES.get(dc.livecell_val, 0)
    else:
        held_out = 0 if fold == "full" else budget.TRAIN_IMAGES - round(budget.TRAIN_IMAGES * (dc.folds - 1) / dc.folds)
    if tc.val_max_images:
        held_out = min(held_out, tc.val_max_images)
    val_rounds = tc.epochs // tc.val_every if tc.val_every else 0
    limit = parse_duration(tc.time_limit) or SESSION_HOURS * 3600
    return budget.Plan(accelerator, len(folds), min(limit, SESSION_HOURS * 3600), n_steps, val_rounds * held_out,
                       sec_per_step)  # fmt: skip


def prepare_train(
    args: argparse.Namespace, username: str, scratch: Path
) -> tuple[bundle_mod.Bundle, list[kt.FoldKernel], budget.Plan]:
    """Everything before the network: config + overrides, folds, the accelerator, the staged bundle,
    each fold's kernel and the plan's GPU time."""
    from cellseg.config.experiment import load_experiment  # imports torch (seconds): train only, not fetch

    overrides = list(args.overrides)
    cfg = load_experiment(args.config, overrides)
    if cfg.train.time_limit is None and parse_duration(args.time_limit):
        overrides.append(f"train.time_limit={args.time_limit}")
        cfg = load_experiment(args.config, overrides)
    parse_duration(cfg.train.time_limit)  # a bad value fails here, not on Kaggle
    folds = kt.parse_folds(args.fold, cfg.data.folds)
    resumes = {f: kt.resume_ref_for(args.resume_from, f, len(folds)) for f in folds}
    if args.init and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init}: file not found")
    template = km.load_template(args.repo / kt.TRAIN_KERNEL_METADATA)
    accelerator = args.accelerator or template.get("machine_shape") or budget.DEFAULT_TRAIN_ACCELERATOR
    problems = budget.accelerator_problems(accelerator)
    if problems:
        raise UsageError(*problems)
    # Kernel metadata first (cheap), with the bundle id left empty; then the bundle (builds the wheel).
    dataset_ref = km.fill(km.load_template(args.repo / kt.TRAIN_DATASET_METADATA), username).get("id", "")
    # A resumed fold is a new session (at least -s2; its number is settled once the latest one is found).
    kernels = [
        kt.fold_kernel(
            args.repo,
            username,
            dataset_ref,
            f,
            args.slug,
            "",
            resumes[f],
            session=kt.split_session(resumes[f] or "")[1] + 1 if resumes[f] else 1,
            accelerator=accelerator,
        )
        for f in folds
    ]
    if args.bundle_out:
        out = Path(args.bundle_out)
    else:  # a dry run stages into a scratch folder, removed afterwards
        out = scratch / "train-bundle" if args.dry_run else args.repo / "dist" / "kaggle-train-bundle"
    say(f"staging the training bundle ({args.config.name}, folds {','.join(folds)}) into {out}")
    b = kt.stage_train_bundle(args.config, out, folds, overrides, args.init, username=username, repo=args.repo)
    for fk in kernels:  # same template, same dataset id; stage_train_bundle validated its metadata
        fk.staged["bundle_id"] = b.marker["bundle_id"]
    return b, kernels, train_plan(cfg, folds, accelerator, args.sec_per_step)


# ----------------------------------------------------------------------------------------------
# Network steps


def output_marker(k: Kaggle, ref: str, version: int | None = None) -> dict | None:
    """The ``cellseg-train-output.json`` of kernel ``ref``'s output (of ``version``, else the latest;
    only that file is downloaded), None when its output has none."""
    with tempfile.TemporaryDirectory(prefix="cellseg-output-marker-") as tmp:
        path = output_file(k, ref, version, kt.OUTPUT_MARKER, Path(tmp))
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None


def kernel_exists(k: Kaggle, ref: str) -> bool:
    """Whether Kaggle knows kernel ``ref`` (its output listing answers; 404, or the client's
    permission error for a kernel that is not there, means no)."""
    try:
        with tempfile.TemporaryDirectory(prefix="cellseg-probe-") as tmp:
            k.retrying("kernel output", k.api.kernels_output, ref, tmp, file_pattern="^$", quiet=True)
    except PushError:
        raise
    except Exception as e:
        if http_status(e) == 404 or (isinstance(e, ValueError) and "Cannot access kernel" in str(e)):
            return False
        raise RemoteError(f"kernel {ref}: {describe(e)}") from None
    return True


def latest_session(k: Kaggle, ref: str, limit: int = 50) -> str:
    """The newest session of the fold kernel ``ref``: ``ref``, ``ref-s2``, ``ref-s3``, ... up to the
    first that does not exist (a ref naming a session starts there)."""
    base, n = kt.split_session(ref)
    latest = ref
    for m in range(n + 1, n + limit):
        candidate = kt.session_ref(base, m)
        if not kernel_exists(k, candidate):
            break
        latest = candidate
    return latest


def resume_source(k: Kaggle, fk: kt.FoldKernel) -> str:
    """The session ``fk`` continues: the latest session of ``--resume-from`` for its fold (or the one
    session named), checked to hold a training output of the same fold."""
    assert fk.resume_ref is not None
    explicit = kt.split_session(fk.resume_ref)[1] > 1
    source = fk.resume_ref if explicit else latest_session(k, fk.resume_ref)
    out = output_marker(k, source)
    if out is None:
        raise RemoteError(
            f"--resume-from {source}: its output holds no {kt.OUTPUT_MARKER} (no finished epoch to resume from)",
            "check the kernel's log on Kaggle; without --resume-from the fold starts afresh",
        )
    if str(out.get("fold")) != fk.fold:
        raise RemoteError(f"--resume-from {source}: its output is fold {out.get('fold')}, not fold {fk.fold}")
    say(
        f"fold {fk.fold}: resumes {source} ({out.get('status')} after epoch {out.get('epochs_done')} of {out.get('epochs')})"
    )
    return source


def check_quota(k: Kaggle, plan: budget.Plan, ignore: bool) -> None:
    """Refuse (exit 2) a plan over the weekly GPU quota left, unless ``ignore``; warn when unreadable."""
    quota = k.gpu_quota_hours()
    if quota is None:
        return
    allowed, left = quota
    say(f"weekly GPU quota: {allowed:.1f} h, {left:.1f} h left; this plan: up to {plan.cap_hours:.1f} h")
    refusal = budget.quota_refusal(plan, allowed, left)
    if refusal and ignore:
        warn(f"warning: {refusal.split(':')[0]} (--ignore-quota: pushing anyway)")
    elif refusal:
        raise UsageError(refusal)


def push_fold(k: Kaggle, repo: Path, fk: kt.FoldKernel) -> int:
    """Push one fold's kernel (the staged entry file + metadata); returns its version number."""
    code = fk.meta["code_file"]
    with tempfile.TemporaryDirectory(prefix="cellseg-train-kernel-") as tmp:
        kernel_code.write_staged(repo / code, Path(tmp) / code, code, fk.staged)
        km.write_json(Path(tmp) / km.KERNEL_METADATA, fk.meta)
        say(f"kernel {fk.ref}: pushing {code} for fold {fk.fold} on {fk.meta.get('machine_shape')} (internet off)")
        resp = push_staged_kernel(
            k,
            Path(tmp),
            fk.ref,
            hint="fix what Kaggle says, then push again",
            rejected_hint="check that the sources exist and are yours, and that you accepted the competition rules",
        )
    say(f"kernel {fk.ref}: version {resp.version_number} pushed ({resp.url or ''})")
    return resp.version_number


def report_end(k: Kaggle, ref: str, version: int, st: Any) -> str:
    """Say how kernel ``ref`` v``version`` ended; returns its final state (STOPPED for a run the time
    limit stopped)."""
    name = st.status.name
    if name == "COMPLETE":
        out = output_marker(k, ref, version)
        if out is None:
            warn(f"kernel {ref}: COMPLETE but its output holds no {kt.OUTPUT_MARKER}")
            return name
        say(
            f"kernel {ref}: fold {out.get('fold')} {out.get('status')} after epoch {out.get('epochs_done')} "
            f"of {out.get('epochs')}, best hold-out score {out.get('best_score')}"
        )
        return "STOPPED" if out.get("status") == "stopped" else name
    tail = kernel_log_tail(k, ref, version=version)
    if tail:
        say(f"--- last lines of the log of {ref} ---\n{tail}\n---")
    warn(f"kernel {ref} v{version} ended in {name}: {st.failure_message or 'no message'}")
    return name


def poll_kernels(k: Kaggle, pushed: dict[str, int]) -> dict[str, str]:
    """Poll every kernel in ``pushed`` (ref -> the version just pushed, always polled by number)
    until each has ended; returns ref -> final status."""
    start = time.monotonic()
    last: dict[str, str] = {}
    ended: dict[str, str] = {}
    while len(ended) < len(pushed):
        for ref, version in pushed.items():
            if ref in ended:
                continue
            st = kernel_status(k, ref, version)
            name = st.status.name
            if name != last.get(ref):
                say(f"kernel {ref} v{version}: {name}")
                last[ref] = name
            if name in ENDED:
                ended[ref] = report_end(k, ref, version, st)
        if len(ended) < len(pushed):
            if time.monotonic() - start > k.wait_timeout:
                raise RemoteError(
                    f"kernels still running after {k.wait_timeout:g} s: "
                    + ", ".join(r for r in pushed if r not in ended),
                    "check them on https://www.kaggle.com/code, then run push.py fetch",
                )
            time.sleep(k.poll_interval)
    return ended


def start_sessions(
    k: Kaggle, args: argparse.Namespace, username: str, kernels: list[kt.FoldKernel]
) -> list[kt.FoldKernel]:
    """Each resumed fold as the next session of its latest one (read-only calls: nothing changes)."""
    dataset_ref = kernels[0].meta["dataset_sources"][0] if kernels else ""
    out = []
    for fk in kernels:
        if fk.resume_ref:
            source = resume_source(k, fk)
            fk = kt.resumed(fk, args.repo, username, dataset_ref, args.slug, source)
            say(f"fold {fk.fold}: pushed as {fk.ref} (kernel source {source})")
        out.append(fk)
    return out


def run_train(args: argparse.Namespace) -> int:
    args.repo = args.repo.resolve()
    username = km.resolve_username(args.username)
    with tempfile.TemporaryDirectory(prefix="cellseg-push-train-") as scratch:
        b, kernels, plan = prepare_train(args, username, Path(scratch))
        notes = args.message or (
            f"cellseg {b.marker['version']} train {b.marker['config_name']} folds {','.join(b.marker['folds'])} "
            f"bundle {b.marker['bundle_id']}"
        )
        if args.dry_run:
            print_train_plan(args, b, kernels, plan, notes, Path(scratch))
            return 0
        say("\n".join(["[plan]", *budget.plan_lines(plan)]))
        k = Kaggle(args.retry_budget, args.poll_interval, args.wait_timeout)
        check_quota(k, plan, args.ignore_quota)  # before anything changes on Kaggle
        kernels = start_sessions(k, args, username, kernels)
        say(bundle_mod.format_table(b.files))
        step_dataset(k, b, notes, wait=True)  # a kernel cannot mount a version still processing
        pushed, failed = {}, []
        for fk in kernels:
            try:
                pushed[fk.ref] = push_fold(k, args.repo, fk)
            except RemoteError as e:  # the other folds still go up; this one is reported at the end
                warn(f"fold {fk.fold}: {e}" + (f" ({e.hint})" if e.hint else ""))
                failed.append(fk.fold)
        ended = poll_kernels(k, pushed) if args.wait and pushed else {}
    return train_summary(args, b, kernels, failed, ended)


def train_summary(
    args: argparse.Namespace, b: bundle_mod.Bundle, kernels: list[kt.FoldKernel], failed: list[str], ended: dict
) -> int:
    """What to run next after a push (resume the stopped folds, fetch); RemoteError when a fold failed."""
    base = kt.split_session(kernels[0].ref)[0][: -len(kt.fold_suffix(kernels[0].fold))]
    fold_arg = ",".join(fk.fold for fk in kernels)
    bad = [fk.fold for fk in kernels if ended.get(fk.ref) not in (None, "COMPLETE", "STOPPED")]
    stopped = [fk.fold for fk in kernels if ended.get(fk.ref) == "STOPPED"]
    if stopped:
        say(
            f"folds {','.join(stopped)} stopped at train.time_limit; continue them with: python tools/push.py train "
            f"--config {args.config} --fold {','.join(stopped)} --resume-from {base} [same overrides]"
        )
    say(
        f"next: python tools/push.py fetch --kernel {base} --fold {fold_arg} --out runs/kaggle/{b.marker['config_name']}"
    )
    if failed or bad:
        raise RemoteError(
            f"folds {','.join(failed + bad)} did not complete ({len(failed)} not pushed, {len(bad)} ended in error)",
            f"fix what the messages above say, then push those folds again with --fold {','.join(failed + bad)}",
        )
    return 0


def fetch_one(k: Kaggle, ref: str, version: int | None, out: Path) -> dict:
    """Download ``ref``'s output into a temporary folder beside ``out``, verify it, rename it to ``out``."""
    with staging(out) as tmp:  # removed if anything below fails
        label = pinned(ref, version)
        say(f"kernel {label}: downloading its output")
        k.call(
            "kernel output",
            k.api.kernels_output,
            label,
            str(tmp),
            force=True,
            quiet=True,
            hint="run the same command again (nothing was written to --out)",
        )
        try:
            marker = kt.verify_output(tmp)
        except CellsegError as e:
            raise RemoteError(
                f"kernel {label}: {e}; nothing was written to {out}",
                "run the same command again; if it persists, the kernel's output is incomplete (see its log)",
            ) from None
        replace_dir(tmp, out, kt.OUTPUT_MARKER, "an earlier fetch")
    return marker


def run_fetch(args: argparse.Namespace) -> int:
    problems = km._ref_problems("--kernel", args.kernel)
    if problems:
        raise UsageError(*problems)
    out_root = Path(args.out)
    if args.fold:
        folds = kt.parse_folds(args.fold, args.folds)
        jobs = [(f"{args.kernel}{kt.fold_suffix(f)}", out_root / kt.fold_suffix(f)[1:]) for f in folds]
    else:
        jobs = [(args.kernel, out_root)]
    for _, out in jobs:  # before any download; exit 2 like every bad input
        check_replaceable(out, kt.OUTPUT_MARKER, "an earlier fetch")
    k = Kaggle(args.retry_budget, args.poll_interval, args.wait_timeout)
    done, failed = [], []
    for ref, out in jobs:
        try:
            if args.fold and args.version is None:  # each fold's latest session
                latest = latest_session(k, ref)
                if latest != ref:
                    say(f"{ref}: latest session is {latest}")
                ref = latest
            marker = fetch_one(k, ref, args.version, out)
        except RemoteError as e:
            warn(f"{e}" + (f" ({e.hint})" if e.hint else ""))
            failed.append(ref)
            continue
        say(f"{ref} -> {out} ({len(marker['files'])} files verified)")
        for line in kt.summarize_output(out, marker):
            say("  " + line)
        done.append(out)
    if done:
        ckpts = " ".join(str(o / kt.RUN_DIR / "best.pth") for o in done)
        say(f"next: cellseg export {ckpts} --out weights/<name>   (then tune and ship: docs/KAGGLE.md)")
    if failed:
        raise RemoteError(f"could not fetch {', '.join(failed)}", "run the same command again for those kernels")
    return 0


# ----------------------------------------------------------------------------------------------


def print_train_plan(
    args: argparse.Namespace,
    b: bundle_mod.Bundle,
    kernels: list[kt.FoldKernel],
    plan: budget.Plan,
    notes: str,
    scratch: Path,
) -> None:
    say("DRY RUN: nothing is sent to Kaggle.")
    say("\n".join(["\n[plan]", *budget.plan_lines(plan), *budget.recipe_lines(b.marker["config_name"])]))
    say("  GetAcceleratorQuotaStatistics: refused (exit 2) when the plan exceeds the hours left, unless --ignore-quota")
    ref = b.metadata["id"]
    say(f"\n[dataset] {ref} from {b.root}")
    say(bundle_mod.format_table(b.files))
    say(f"uploads (dir_mode=zip): {', '.join(upload_names(b))}")
    say("marker: " + json.dumps({k: v for k, v in b.marker.items() if k != "files"}, indent=2))
    say(
        f"calls: GetDatasetStatus {ref}; CreateDataset or CreateDatasetVersion (versionNotes={notes!r}); poll until ready"
    )
    for fk in kernels:
        say(f"\n[kernel] {fk.ref} (fold {fk.fold})")
        code = fk.meta["code_file"]
        info = kernel_code.write_staged(args.repo / code, scratch / "kernels" / fk.fold / code, code, fk.staged)
        say(bundle_mod.format_table([info]))
        if fk.resume_ref:
            say(
                f"  resumes the latest session of {fk.resume_ref} (ListKernelSessionOutput of {fk.resume_ref}, "
                f"-s2, -s3, ... until one does not exist; its {kt.OUTPUT_MARKER} must be fold {fk.fold}); "
                f"pushed as the next session (-s<N+1>) with that kernel as its only kernel source"
            )
        say("kernel-metadata.json: " + json.dumps(fk.meta, indent=2))
        say(f"written into {code}: STAGED = {fk.staged!r}")
        say(
            f"  kernels.KernelsApiService/SaveKernel (machineShape={fk.meta.get('machine_shape')}, enableGpu=true, "
            "enableInternet=false, isPrivate=true)"
        )
        if args.wait:
            say(
                "  poll GetKernelSessionStatus of the pushed version (owner/slug/VERSION) until it ends; "
                "COMPLETE: read its output marker; ERROR: log tail"
            )


def add_common(p: argparse.ArgumentParser, repo: Path | None) -> None:
    p.add_argument("--username", default=None, help="Kaggle user name (default: KAGGLE_USERNAME, then kaggle.json)")
    p.add_argument(
        "--repo",
        type=Path,
        default=repo or repo_root(),
        metavar="DIR",
        help="checkout with the metadata templates and kernel/",
    )
    p.add_argument(
        "--poll-interval", type=seconds, default=60.0, metavar="S", help="seconds between polls (default 60)"
    )
    p.add_argument(
        "--wait-timeout", type=seconds, default=13 * 3600, metavar="S", help="give up waiting after S s (default 13 h)"
    )
    p.add_argument(
        "--retry-budget", type=seconds, default=120.0, metavar="S", help="retry one call for at most S s (default 120)"
    )


def build_parser(repo: Path | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="push.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Details: docs/KAGGLE.md",
    )
    sub = p.add_subparsers(dest="step", required=True)
    t = sub.add_parser(
        "train",
        help="train on Kaggle: bundle + one GPU kernel per fold",
        description=textwrap.dedent("       " + __doc__.split("train  ")[1].split("fetch  ")[0]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/*.yaml)")
    t.add_argument(
        "--fold",
        default="0",
        help="K, K,L,..., all (every fold, one kernel each) or full (all images, no validation); default 0",
    )
    t.add_argument("--init", type=Path, default=None, help="starting weights shipped in the bundle (e.g. COCO R50)")
    t.add_argument(
        "--resume-from",
        default=None,
        metavar="OWNER/SLUG",
        help="continue from this kernel's output (-fold{K} appended per fold); added to kernel_sources",
    )
    t.add_argument("--slug", default=None, help="kernel slug before -fold{K} (default: kernel-train-metadata.json's)")
    t.add_argument(
        "--time-limit",
        default=DEFAULT_TIME_LIMIT,
        help=f"train.time_limit unless the config or an override sets it (default {DEFAULT_TIME_LIMIT}; 0 = none)",
    )
    t.add_argument(
        "--bundle-out",
        default=None,
        metavar="DIR",
        help="where to stage (default dist/kaggle-train-bundle; a --dry-run keeps it only when given)",
    )
    t.add_argument(
        "--accelerator",
        default=None,
        metavar="ID",
        help=f"Kaggle accelerator id (machine_shape; default: kernel-train-metadata.json's, "
        f"{budget.DEFAULT_TRAIN_ACCELERATOR} = 2 x T4); one of {', '.join(budget.ACCELERATORS)}",
    )
    t.add_argument(
        "--sec-per-step",
        type=seconds,
        default=None,
        metavar="S",
        help="measured seconds per training step on that accelerator (benchmarks/gpu_check.sh): the plan's "
        f"expected hours (default: an estimate of {budget.ESTIMATED_SEC_PER_STEP:g} s)",
    )
    t.add_argument(
        "--ignore-quota",
        action="store_true",
        help="push even when the plan (kernels x time limit) exceeds the weekly GPU quota left",
    )
    t.add_argument("--wait", action="store_true", help="poll every kernel until it ends")
    t.add_argument("-m", "--message", default=None, help="dataset version notes")
    t.add_argument("--dry-run", action="store_true", help="stage and print the plan; no network")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=12")
    add_common(t, repo)
    f = sub.add_parser(
        "fetch",
        help="download a training kernel's output and verify it",
        description=textwrap.dedent("       " + __doc__.split("fetch  ")[1].split("\n\n")[0]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--kernel", required=True, metavar="OWNER/SLUG", help="the kernel (with --fold: without -fold{K})")
    f.add_argument("--fold", default=None, help="K, K,L,... or all: fetch OWNER/SLUG-fold{K} into OUT/fold{K}")
    f.add_argument("--folds", type=int, default=5, help="number of folds for --fold all (default 5)")
    f.add_argument(
        "--version", type=version_number, default=None, metavar="N", help="kernel version (default: the latest)"
    )
    f.add_argument("--out", type=Path, required=True, help="folder to create, e.g. runs/kaggle/r50")
    add_common(f, repo)
    return p


def main(argv: list[str] | None = None, repo: Path | None = None) -> int:
    """``tools/push.py train|fetch``; ``repo``: the default of ``--repo``."""
    args = build_parser(repo).parse_args(argv)
    return report_errors(lambda: run_train(args) if args.step == "train" else run_fetch(args))
