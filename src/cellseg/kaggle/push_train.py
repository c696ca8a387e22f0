"""Train on Kaggle's GPU from the command line, and bring the checkpoints back (``push.py train`` / ``fetch``).

    python tools/push.py train --config configs/maskrcnn_r50_fpn.yaml --fold all --init coco.pth --wait
    python tools/push.py train --config configs/maskrcnn_r50_fpn.yaml --fold 3 --resume-from OWNER/sartorius-cellseg-train
    python tools/push.py fetch --kernel OWNER/sartorius-cellseg-train --fold all --out runs/kaggle/r50

train  1. (local, no network) load the config with the overrides, add ``train.time_limit=11h30m``
          unless it is set, stage the training bundle (``cellseg.kaggle.training``: wheel + config +
          ``--init`` weights + marker) and check the dataset and every fold's kernel metadata;
       2. with ``--resume-from``: check that each source kernel's output holds a training output of
          the same fold (its ``cellseg-train-output.json``), before anything changes on Kaggle;
       3. upload the bundle as a version of ``{username}/sartorius-cellseg-train-bundle`` (as
          ``push.py dataset`` does) and wait until it is ready;
       4. push ``kernel/train.py`` once per fold as ``{username}/<slug>-fold{K}`` (GPU on, internet off,
          private; sources: the competition, the bundle, and the ``--resume-from`` kernel), the fold
          and the bundle id written into the pushed file;
       5. ``--wait``: poll every kernel until it ends; print each one's status (complete / stopped by
          the time limit / failed) or, on ERROR, the tail of its log.
fetch  download each kernel's output with the client into a temporary folder beside ``--out``,
       verify every file against the kernel's ``cellseg-train-output.json`` (size, sha256), then
       rename it into place: a partial or truncated download is never left looking complete.
       Prints the metrics summary and the ``cellseg export`` command to run next.

Exit status: 0 ok, 2 bad input / credentials / metadata (before any network call), 1 Kaggle refused
or failed, or a kernel did not complete. The same retry and credential rules as push.py apply.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path

from cellseg.config.loader import parse_duration
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, replace_dir, staging
from cellseg.kaggle import bundle as bundle_mod
from cellseg.kaggle import kernel_code
from cellseg.kaggle import metadata as km
from cellseg.kaggle import training as kt
from cellseg.kaggle.client import Kaggle, RemoteError, UsageError, report_errors, say, seconds, warn
from cellseg.kaggle.remote import kernel_log_tail, push_staged_kernel, step_dataset, upload_names
from cellseg.paths import repo_root

DEFAULT_TIME_LIMIT = "11h30m"
ENDED = ("COMPLETE", "ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED")


# ----------------------------------------------------------------------------------------------
# Local preparation (no network)


def prepare_train(
    args: argparse.Namespace, username: str, scratch: Path
) -> tuple[bundle_mod.Bundle, list[kt.FoldKernel]]:
    """Everything before the network: config + overrides, folds, the staged bundle, each fold's kernel."""
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
    # Kernel metadata first (cheap), with the bundle id left empty; then the bundle (builds the wheel).
    dataset_ref = km.fill(km.load_template(args.repo / kt.TRAIN_DATASET_METADATA), username).get("id", "")
    kernels = [kt.fold_kernel(args.repo, username, dataset_ref, f, args.slug, "", resumes[f]) for f in folds]
    if args.bundle_out:
        out = Path(args.bundle_out)
    else:  # a dry run stages into a scratch folder, removed afterwards
        out = scratch / "train-bundle" if args.dry_run else args.repo / "dist" / "kaggle-train-bundle"
    say(f"staging the training bundle ({args.config.name}, folds {','.join(folds)}) into {out}")
    b = kt.stage_train_bundle(args.config, out, folds, overrides, args.init, username=username, repo=args.repo)
    for fk in kernels:  # same template, same dataset id; stage_train_bundle validated its metadata
        fk.staged["bundle_id"] = b.marker["bundle_id"]
    return b, kernels


# ----------------------------------------------------------------------------------------------
# Network steps


def output_marker(k: Kaggle, ref: str) -> dict | None:
    """The ``cellseg-train-output.json`` of kernel ``ref``'s latest output (only that file is downloaded),
    None when its output has none."""
    import json

    with tempfile.TemporaryDirectory(prefix="cellseg-output-marker-") as tmp:
        pattern = "^" + kt.OUTPUT_MARKER.replace(".", r"\.") + "$"
        k.call("kernel output", k.api.kernels_output, ref, tmp, file_pattern=pattern, force=True, quiet=True)
        path = Path(tmp) / kt.OUTPUT_MARKER
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None


def check_resume_source(k: Kaggle, fk: kt.FoldKernel) -> None:
    out = output_marker(k, fk.resume_ref)
    if out is None:
        raise RemoteError(
            f"--resume-from {fk.resume_ref}: its output holds no {kt.OUTPUT_MARKER} (no finished epoch to resume from)",
            "check the kernel's log on Kaggle; without --resume-from the fold starts afresh",
        )
    if str(out.get("fold")) != fk.fold:
        raise RemoteError(f"--resume-from {fk.resume_ref}: its output is fold {out.get('fold')}, not fold {fk.fold}")
    say(
        f"{fk.ref}: resumes {fk.resume_ref} ({out.get('status')} after epoch {out.get('epochs_done')} of "
        f"{out.get('epochs')})"
    )


def push_fold(k: Kaggle, repo: Path, fk: kt.FoldKernel) -> int:
    """Push one fold's kernel (the staged entry file + metadata); returns its version number."""
    code = fk.meta["code_file"]
    with tempfile.TemporaryDirectory(prefix="cellseg-train-kernel-") as tmp:
        kernel_code.write_staged(repo / code, Path(tmp) / code, code, fk.staged)
        km.write_json(Path(tmp) / km.KERNEL_METADATA, fk.meta)
        say(f"kernel {fk.ref}: pushing {code} for fold {fk.fold} (GPU on, internet off)")
        resp = push_staged_kernel(
            k,
            Path(tmp),
            fk.ref,
            hint="fix what Kaggle says, then push again",
            rejected_hint="check that the sources exist and are yours, and that you accepted the competition rules",
        )
    say(f"kernel {fk.ref}: version {resp.version_number} pushed ({resp.url or ''})")
    return resp.version_number


def poll_kernels(k: Kaggle, pushed: dict[str, int]) -> dict[str, str]:
    """Poll every kernel in ``pushed`` (ref -> version) until each has ended; returns ref -> final status.
    Each ending is reported: the output's status on COMPLETE, the log tail on ERROR."""
    start, last, ended = time.monotonic(), {}, {}
    while len(ended) < len(pushed):
        for ref, version in pushed.items():
            if ref in ended:
                continue
            st = k.call("kernel status", k.api.kernels_status, ref)
            name = st.status.name
            if name != last.get(ref):
                say(f"kernel {ref} v{version}: {name}")
                last[ref] = name
            if name not in ENDED:
                continue
            ended[ref] = name
            if name == "COMPLETE":
                out = output_marker(k, ref)
                if out is None:
                    warn(f"kernel {ref}: COMPLETE but its output holds no {kt.OUTPUT_MARKER}")
                else:
                    say(
                        f"kernel {ref}: fold {out.get('fold')} {out.get('status')} after epoch {out.get('epochs_done')} "
                        f"of {out.get('epochs')}, best hold-out score {out.get('best_score')}"
                    )
                    if out.get("status") == "stopped":
                        ended[ref] = "STOPPED"
            else:
                tail = kernel_log_tail(k, ref)
                if tail:
                    say(f"--- last lines of the log of {ref} ---\n{tail}\n---")
                warn(f"kernel {ref} v{version} ended in {name}: {st.failure_message or 'no message'}")
        if len(ended) < len(pushed):
            if time.monotonic() - start > k.wait_timeout:
                raise RemoteError(
                    f"kernels still running after {k.wait_timeout:g} s: "
                    + ", ".join(r for r in pushed if r not in ended),
                    "check them on https://www.kaggle.com/code, then run push.py fetch",
                )
            time.sleep(k.poll_interval)
    return ended


def run_train(args: argparse.Namespace) -> int:
    args.repo = args.repo.resolve()
    username = km.resolve_username(args.username)
    with tempfile.TemporaryDirectory(prefix="cellseg-push-train-") as scratch:
        b, kernels = prepare_train(args, username, Path(scratch))
        notes = args.message or (
            f"cellseg {b.marker['version']} train {b.marker['config_name']} folds {','.join(b.marker['folds'])} "
            f"bundle {b.marker['bundle_id']}"
        )
        if args.dry_run:
            print_train_plan(args, b, kernels, notes, Path(scratch))
            return 0
        k = Kaggle(args.retry_budget, args.poll_interval, args.wait_timeout)
        for fk in kernels:  # before anything changes on Kaggle
            if fk.resume_ref:
                check_resume_source(k, fk)
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
    base = kernels[0].ref[: -len(kt.fold_suffix(kernels[0].fold))]
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
        label = f"{ref}/{version}" if version else ref
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
    args: argparse.Namespace, b: bundle_mod.Bundle, kernels: list[kt.FoldKernel], notes: str, scratch: Path
) -> None:
    import json

    say("DRY RUN: nothing is sent to Kaggle.")
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
        say("kernel-metadata.json: " + json.dumps(fk.meta, indent=2))
        say(f"written into {code}: STAGED = {fk.staged!r}")
        if fk.resume_ref:
            say(f"  ListKernelSessionOutput {fk.resume_ref}: its {kt.OUTPUT_MARKER} must be fold {fk.fold}")
        say("  kernels.KernelsApiService/SaveKernel (enableGpu=true, enableInternet=false, isPrivate=true)")
        if args.wait:
            say("  poll GetKernelSessionStatus until it ends; COMPLETE: read its output marker; ERROR: log tail")


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
    f.add_argument("--version", type=int, default=None, metavar="N", help="kernel version (default: the latest)")
    f.add_argument("--out", type=Path, required=True, help="folder to create, e.g. runs/kaggle/r50")
    add_common(f, repo)
    return p


def main(argv: list[str] | None = None, repo: Path | None = None) -> int:
    """``tools/push.py train|fetch``; ``repo``: the default of ``--repo``."""
    args = build_parser(repo).parse_args(argv)
    return report_errors(lambda: run_train(args) if args.step == "train" else run_fetch(args))
