"""``tools/push.py``: upload the bundle, push the kernel and submit it to the competition, with Kaggle's own client.

    python tools/push.py all --wait --weights weights/r50/manifest.yaml  # dataset -> kernel -> score of that ensemble
    python tools/push.py dataset -m "thresholds v2" # new dataset version from weights/demo (staged first)
    python tools/push.py kernel                     # push kernel/submit.py, wait for COMPLETE or ERROR (+ log)
    python tools/push.py submit --wait              # submit the latest kernel version, print the score
    python tools/push.py all --dry-run              # the full plan (files, sizes, metadata, calls), no network
    python tools/push.py train --config configs/maskrcnn_r50_fpn.yaml --fold all --init coco.pth --wait
    python tools/push.py fetch --kernel OWNER/sartorius-cellseg-train --fold all --out runs/kaggle/r50

Steps (see docs/KAGGLE.md):
  dataset  stage the bundle (``cellseg bundle``) unless ``--bundle`` names a staged one; create the
           dataset when new (private), otherwise wait until the previous version is ready and add a
           version with notes. Sub-folders go up zipped (``dir_mode="zip"``). ``--wait``/``all``: poll
           until the new version is ready.
  kernel   stage kernel-metadata.json (owner filled in) + the entry file, check the dataset is ready,
           push, poll until COMPLETE or ERROR; on ERROR print the tail of the kernel's log.
  submit   ``competition_submit_code`` with the kernel version; ``--wait``: poll until scored.
  all      the three in order, stopping at the first failure with what to do next.
  train    train on Kaggle's GPU: a training bundle + one kernel per fold (cellseg.kaggle.push_train;
           ``python tools/push.py train --help``).
  fetch    download a training kernel's output, verify every file, print its metrics.

Provenance: every plan prints what each model of the ensemble was trained on (the manifest's
``provenance``). ``submit`` and ``all`` refuse (exit 2, before any network call) an ensemble whose
every model was trained on no competition data (``cellseg synth`` output and ``cellseg import-labels``
data only), such as the committed weights/demo, unless
``--allow-synthetic``; ``--dry-run`` shows the same verdict without refusing. Models of unknown
provenance (older manifests) are reported so and never refused.

Exit status: 0 ok, 2 bad input / credentials / metadata (one line per problem, before any network
call), 1 remote failure. Transient failures (connection errors, 5xx, 429) are retried with backoff for
at most ``--retry-budget`` seconds per call. A failed upload creates no dataset version; running the
same command again resumes top-level file uploads from ``$TMPDIR/.kaggle-uploads-<euid>/``.

The API key is never printed: the kaggle client's verbose mode (which would print request headers)
is switched off, and no message here includes it.

Testing hook: when ``CELLSEG_KAGGLE_ENDPOINT`` is set (e.g. ``http://127.0.0.1:8765``), the client
talks to that server instead of Kaggle (``tests/fake_kaggle.py`` serves one). Never set it otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cellseg.config.manifest import load_manifest
from cellseg.kaggle import bundle as bundle_mod
from cellseg.kaggle import kernel_code
from cellseg.kaggle import metadata as km
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
)
from cellseg.kaggle.remote import (
    kernel_log_tail,
    kernel_status,
    output_file,
    push_staged_kernel,
    step_dataset,
    upload_names,
)
from cellseg.model import provenance as prov
from cellseg.paths import repo_root

SUBMISSION_FILE = "submission.csv"
STEPS = ("dataset", "kernel", "submit")


# ----------------------------------------------------------------------------------------------
# Local preparation (no network)


def load_kernel_meta(repo: Path, username: str, dataset_ref: str) -> dict:
    meta = km.fill(km.load_template(repo / km.KERNEL_METADATA), username)
    problems = km.validate_kernel_metadata(meta, repo)
    if dataset_ref not in meta.get("dataset_sources", []):
        problems.append(
            f"kernel dataset_sources: {meta.get('dataset_sources')} does not include the bundle dataset {dataset_ref}"
        )
    if problems:
        raise UsageError(*problems)
    return meta


def stage_kernel(repo: Path, meta: dict, folder: Path) -> list[bundle_mod.BundleFile]:
    """Write the entry file (same relative path; kernel/kaggle_env.py inlined, since Kaggle runs one
    file) and the filled kernel-metadata.json into ``folder``."""
    code = meta["code_file"]
    info = kernel_code.write_staged(repo / code, folder / code, code)
    km.write_json(folder / km.KERNEL_METADATA, meta)
    return [info]


def prepare_bundle(args: argparse.Namespace, username: str, scratch: Path) -> bundle_mod.Bundle:
    """The bundle to upload: ``--bundle`` as staged, else staged now from ``--weights``."""
    if args.bundle:
        b = bundle_mod.read_bundle(args.bundle)
    else:
        manifest = Path(args.weights) if args.weights else args.repo / "weights" / "demo" / "manifest.yaml"
        out = scratch / "bundle" if args.dry_run else args.repo / "dist" / "kaggle-bundle"
        say(f"staging the bundle from {manifest} into {out}")
        b = bundle_mod.stage_bundle(manifest, out, username=username, repo=args.repo)
    problems = km.validate_dataset_metadata(b.metadata)
    owner = str(b.metadata.get("id", "")).split("/")[0]
    if not problems and owner != username:
        problems.append(
            f"dataset id: {b.metadata['id']} is owned by {owner!r}, but the user is {username!r} (stage it again)"
        )
    if problems:
        raise UsageError(*problems)
    return b


def ensemble_manifest(args: argparse.Namespace, steps: list[str]) -> Path | None:
    """The manifest of the ensemble these steps ship or submit: ``--bundle``'s, else ``--weights``;
    for ``kernel``/``submit`` alone the bundle staged last (dist/kaggle-bundle), else the default
    weights/demo. None when none of them exists (nothing local to check)."""
    if args.bundle:
        b = bundle_mod.read_bundle(args.bundle)
        return b.root / b.marker["manifest"]
    if args.weights:
        p = Path(args.weights)
        return p / "manifest.yaml" if p.is_dir() else p
    staged = args.repo / "dist" / "kaggle-bundle"
    if "dataset" not in steps and (staged / bundle_mod.MARKER).is_file():
        return staged / bundle_mod.read_bundle(staged).marker["manifest"]
    default = args.repo / "weights" / "demo" / "manifest.yaml"
    return default if default.is_file() else None


def check_provenance(args: argparse.Namespace, steps: list[str]) -> list[str]:
    """The plan's provenance block for the shipped ensemble; raises :class:`UsageError` (one line,
    exit 2, before any network call) when ``submit`` would send an ensemble trained on no competition
    data (only ``cellseg synth`` and ``cellseg import-labels`` data), unless ``--allow-synthetic``.
    ``--dry-run`` reports the same verdict without refusing."""
    manifest = ensemble_manifest(args, steps)
    if manifest is None:
        return ["provenance: no local manifest of the ensemble (pass --weights or --bundle); not checked"]
    m = load_manifest(manifest, verify=False)
    lines = [f"provenance ({manifest}):", *prov.plan_lines(m)]
    if "submit" not in steps or not prov.no_competition_data(m):
        return lines
    if args.allow_synthetic:
        return lines + ["  submit: allowed (--allow-synthetic)"]
    what = (
        "synthetic data only"
        if prov.synthetic_only(m)
        else "synthetic and imported data only (`cellseg import-labels`: no competition data)"
    )
    refusal = (
        f"{manifest}: every model was trained on {what} ({prov.summarize(m)}); a submission "
        "would score near 0 and use up one of the day's submissions: ship weights trained on the competition "
        "data (--weights), or pass --allow-synthetic"
    )
    if args.dry_run:
        return lines + [f"  submit: would be REFUSED (exit 2): {refusal}"]
    raise UsageError(refusal)


def default_message(b: bundle_mod.Bundle | None) -> str:
    if b is None:
        return "cellseg submission"
    commit = (b.marker.get("git_commit") or "")[:10]
    return f"cellseg {b.marker.get('version', '?')} weights={b.marker.get('weights', '?')}" + (
        f" commit={commit}" if commit else ""
    )


# ----------------------------------------------------------------------------------------------
# Steps


def step_kernel(k: Kaggle, repo: Path, meta: dict, dataset_ref: str) -> int:
    """Push the kernel and poll it to the end; returns its version number."""
    ref = meta["id"]
    state = k.dataset_state(dataset_ref)
    if state is None:
        raise RemoteError(
            f"the kernel's dataset {dataset_ref} does not exist on Kaggle", "run: python tools/push.py dataset"
        )
    if state != "ready":
        say(f"dataset {dataset_ref} is '{state}': waiting until it is ready before pushing the kernel")
        k.wait_dataset(dataset_ref)
    with tempfile.TemporaryDirectory(prefix="cellseg-kernel-") as tmp:
        stage_kernel(repo, meta, Path(tmp))
        say(f"kernel {ref}: pushing {meta['code_file']} (internet off, GPU on)")
        resp = push_staged_kernel(
            k,
            Path(tmp),
            ref,
            hint="fix what Kaggle says, then run: python tools/push.py kernel",
            answered_hint="fix it, then run: python tools/push.py kernel",
            rejected_hint="check that the dataset exists and is yours, and that you accepted the competition rules",
        )
    version = resp.version_number
    say(f"kernel {ref}: version {version} pushed ({resp.url or ''}); waiting for it to run")
    start, last = time.monotonic(), None
    while True:
        st = kernel_status(k, ref, version)
        name = st.status.name
        if name != last:
            say(f"kernel {ref} v{version}: {name}")
            last = name
        if name == "COMPLETE":
            return version
        if name in ("ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"):
            tail = kernel_log_tail(k, ref, version=version)
            if tail:
                say(f"--- last lines of the kernel log ---\n{tail}\n---")
            raise RemoteError(
                f"kernel {ref} v{version} ended in {name}: {st.failure_message or 'no message'}",
                "fix the kernel (run `cellseg dry-run` locally), then: python tools/push.py kernel",
            )
        if time.monotonic() - start > k.wait_timeout:
            raise RemoteError(
                f"kernel {ref} still {name} after {k.wait_timeout:g} s",
                f"check https://www.kaggle.com/code/{ref}, then run: python tools/push.py submit",
            )
        time.sleep(k.poll_interval)


def latest_complete_version(k: Kaggle, ref: str, lookback: int = 20) -> int:
    """The newest version of kernel ``ref`` whose run is COMPLETE (looking back ``lookback`` versions
    from the current one); RemoteError when there is none."""
    current = k.current_version(ref)
    if not current:
        raise RemoteError(f"kernel {ref}: Kaggle reports no version", "push it first: python tools/push.py kernel")
    for v in range(current, max(current - lookback, 0), -1):
        name = kernel_status(k, ref, v).status.name
        if name == "COMPLETE":
            return v
        say(f"kernel {ref} v{v}: {name}, not complete")
    raise RemoteError(
        f"kernel {ref}: none of versions {max(current - lookback + 1, 1)}..{current} is COMPLETE",
        "run the kernel to the end (python tools/push.py kernel), or pass --kernel-version",
    )


def check_submission_output(k: Kaggle, ref: str, version: int) -> None:
    """Refuse (exit 2, before submitting) a kernel version whose output holds no submission.csv:
    the submission would fail and still use up one of the day's submissions."""
    with tempfile.TemporaryDirectory(prefix="cellseg-submission-") as tmp:
        if output_file(k, ref, version, SUBMISSION_FILE, Path(tmp)) is None:
            raise UsageError(
                f"kernel {ref} v{version}: its output holds no {SUBMISSION_FILE}; not submitted "
                "(see its log, or pass another --kernel-version)"
            )


def step_submit(k: Kaggle, kernel_ref: str, version: int | None, message: str, wait: bool) -> None:
    """Submit ``version`` of the kernel (the latest COMPLETE one when None), always by its number,
    after checking that its output holds submission.csv."""
    if version is None:
        version = latest_complete_version(k, kernel_ref)
        say(f"kernel {kernel_ref}: latest complete version is v{version}")
    check_submission_output(k, kernel_ref, version)
    label = f"{kernel_ref} v{version}"
    say(f"submitting {label} to {km.COMPETITION}")
    resp = k.call(
        "submit",
        k.api.competition_submit_code,
        SUBMISSION_FILE,
        message,
        km.COMPETITION,
        kernel_ref,
        version,
        quiet=True,
        idempotent=False,
        hint="check that the kernel version completed and wrote submission.csv, and your daily submission count",
    )
    ref = getattr(resp, "ref", 0)
    say(f"submission {ref}: {getattr(resp, 'message', '')}")
    if not ref:
        raise RemoteError("submit: Kaggle returned no submission reference", "check the competition's submissions page")
    if not wait:
        say(f"scoring takes a while: see https://www.kaggle.com/competitions/{km.COMPETITION}/submissions")
        return
    start, last = time.monotonic(), None
    while True:
        try:
            sub = k.retrying("submission status", k.api.get_submission, ref)
            name = sub.status.name
        except PushError:
            raise
        except Exception as e:
            if http_status(e) != 404:  # a fresh submission may not be readable yet
                raise RemoteError(f"submission {ref}: {describe(e)}") from None
            sub, name = None, "PENDING"
        if name != last:
            say(f"submission {ref}: {name}")
            last = name
        if name == "COMPLETE":
            say(
                f"submission {ref}: public score {sub.public_score or '(not published)'}"
                + (f", private score {sub.private_score}" if sub.private_score else "")
            )
            return
        if name == "ERROR":
            raise RemoteError(
                f"submission {ref} failed: {(sub.error_description or 'no message').strip()}",
                "run `cellseg validate` on the kernel's output and `cellseg dry-run` locally",
            )
        if time.monotonic() - start > k.wait_timeout:
            raise RemoteError(
                f"submission {ref} still {name} after {k.wait_timeout:g} s",
                f"see https://www.kaggle.com/competitions/{km.COMPETITION}/submissions",
            )
        time.sleep(k.poll_interval)


# ----------------------------------------------------------------------------------------------
# Dry run


def print_plan(
    steps: list[str],
    b: bundle_mod.Bundle | None,
    kmeta: dict | None,
    kfiles: list,
    message: str,
    args: argparse.Namespace,
    provenance: list[str] | None = None,
) -> None:
    say("DRY RUN: nothing is sent to Kaggle.")
    if provenance:
        say("\n[weights] " + "\n".join(provenance))
    if b is not None:
        ref = b.metadata["id"]
        say(f"\n[dataset] {ref} from {b.root}")
        say(bundle_mod.format_table(b.files))
        say(f"uploads (dir_mode=zip): {', '.join(upload_names(b))}")
        say("dataset-metadata.json: " + json.dumps(b.metadata, indent=2))
        say("calls:")
        say(f"  datasets.DatasetApiService/GetDatasetStatus {ref}")
        say(
            "  if 404: blobs.BlobApiService/StartBlobUpload + PUT per upload; datasets.DatasetApiService/CreateDataset (isPrivate=true)"
        )
        say(
            "  else:   wait until status is 'ready'; StartBlobUpload + PUT per upload; "
            f"datasets.DatasetApiService/CreateDatasetVersion (versionNotes={message!r})"
        )
        if args.wait or "kernel" in steps:
            say("  poll GetDatasetStatus until 'ready'")
    if kmeta is not None:
        say(f"\n[kernel] {kmeta['id']}")
        say(bundle_mod.format_table(kfiles))
        say("kernel-metadata.json: " + json.dumps(kmeta, indent=2))
        say("calls:")
        say(f"  GetDatasetStatus {kmeta['dataset_sources']} must be 'ready'")
        say("  kernels.KernelsApiService/SaveKernel (enableInternet=false, enableGpu=true, isPrivate=true)")
        say(
            "  poll kernels.KernelsApiService/GetKernelSessionStatus until COMPLETE or ERROR;"
            " on ERROR ListKernelSessionOutput -> log tail"
        )
    if "submit" in steps:
        kernel_ref = kmeta["id"] if kmeta else "?"
        version = (
            "the version just pushed"
            if "kernel" in steps
            else (f"v{args.kernel_version}" if args.kernel_version else "the latest COMPLETE version")
        )
        say(f"\n[submit] {kernel_ref} ({version}) -> {km.COMPETITION}")
        if not args.kernel_version and "kernel" not in steps:
            say("  kernels.KernelsApiService/GetKernel -> current version; GetKernelSessionStatus per version")
        say(f"  ListKernelSessionOutput (that version) must list {SUBMISSION_FILE}, else refused (exit 2)")
        say(
            f"  competitions.CompetitionApiService/CreateCodeSubmission (fileName={SUBMISSION_FILE}, "
            f"description={message!r})"
        )
        if args.wait:
            say("  poll competitions.CompetitionApiService/GetSubmission until COMPLETE, print the score")


# ----------------------------------------------------------------------------------------------


def step_help(step: str) -> str:
    """The module docstring's paragraph for ``step`` (under "Steps") and its example lines."""
    lines = __doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {step} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("       ")), len(lines))
    examples = [line for line in lines if line.strip().startswith(f"python tools/push.py {step} ")]
    return "\n".join(["examples:", *examples, "", *lines[start:end]])


def build_parser(step: str | None = None, repo: Path | None = None) -> argparse.ArgumentParser:
    """The command line; ``step`` (the first argument, when it names one) makes --help that step's."""
    p = argparse.ArgumentParser(
        prog="push.py",
        description=step_help(step) if step else __doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Details: docs/KAGGLE.md",
    )
    p.add_argument(
        "step",
        choices=(*STEPS, "all", "train", "fetch"),
        help="what to do (all = dataset, kernel, submit in order; train / fetch: see their own --help)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the full plan (files, sizes, metadata, calls); no network"
    )
    p.add_argument("-m", "--message", default=None, help="dataset version notes and submission description")
    p.add_argument(
        "--wait", action="store_true", help="wait for the last step's result too (dataset ready / submission scored)"
    )
    p.add_argument("--username", default=None, help="Kaggle user name (default: KAGGLE_USERNAME, then kaggle.json)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="MANIFEST",
        help="ensemble to ship (default: weights/demo/manifest.yaml); staged into dist/kaggle-bundle",
    )
    p.add_argument(
        "--bundle", default=None, metavar="DIR", help="upload this already staged bundle (cellseg bundle --out DIR)"
    )
    p.add_argument(
        "--repo",
        type=Path,
        default=repo or repo_root(),
        metavar="DIR",
        help="checkout holding the metadata templates and kernel/submit.py (default: this one)",
    )
    p.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="submit/all: submit even when every model was trained on no competition data (`cellseg synth` "
        "and `cellseg import-labels` data only; refused otherwise: it would score near 0 and use up a daily "
        "submission)",
    )
    p.add_argument(
        "--kernel-version",
        type=version_number,
        default=None,
        metavar="N",
        help="submit: kernel version to submit (default: the one just pushed, else the latest COMPLETE one)",
    )
    p.add_argument(
        "--poll-interval", type=seconds, default=20.0, metavar="S", help="seconds between status polls (default 20)"
    )
    p.add_argument(
        "--wait-timeout",
        type=seconds,
        default=10 * 3600,
        metavar="S",
        help="give up waiting for a status after S seconds (default 36000)",
    )
    p.add_argument(
        "--retry-budget",
        type=seconds,
        default=120.0,
        metavar="S",
        help="retry transient failures of one call for at most S seconds (default 120)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    steps = list(STEPS) if args.step == "all" else [args.step]
    args.repo = args.repo.resolve()
    username = km.resolve_username(args.username)
    with tempfile.TemporaryDirectory(prefix="cellseg-push-") as scratch:
        # Everything local first: the provenance check, staging and every metadata check, before any
        # network call (a refused submission costs neither a wheel build nor an upload).
        provenance = check_provenance(args, steps)
        b = prepare_bundle(args, username, Path(scratch)) if "dataset" in steps else None
        dataset_ref = (
            b.metadata["id"] if b else km.fill(km.load_template(args.repo / km.DATASET_METADATA), username)["id"]
        )
        kmeta = load_kernel_meta(args.repo, username, dataset_ref) if {"kernel", "submit"} & set(steps) else None
        message = args.message or default_message(b)
        if args.dry_run:
            kfiles = stage_kernel(args.repo, kmeta, Path(scratch) / "kernel") if kmeta and "kernel" in steps else []
            print_plan(
                steps, b, kmeta if "kernel" in steps or "submit" in steps else None, kfiles, message, args, provenance
            )
            return 0
        k = Kaggle(args.retry_budget, args.poll_interval, args.wait_timeout)
        if b is not None:
            say(bundle_mod.format_table(b.files))
        say("\n".join(provenance))
        version = args.kernel_version
        step = steps[0]
        try:
            if b is not None:  # the dataset step
                step_dataset(k, b, message, wait=args.wait or len(steps) > 1)
            if "kernel" in steps and kmeta is not None:
                step = "kernel"
                version = step_kernel(k, args.repo, kmeta, dataset_ref)
            if "submit" in steps and kmeta is not None:
                step = "submit"
                step_submit(k, kmeta["id"], version, message, wait=args.wait)
        except RemoteError as e:
            rest = steps[steps.index(step) + 1 :]
            if rest:  # `all` stopped early: say where to resume
                e.hint = (
                    (e.hint + "; " if e.hint else "")
                    + "afterwards: "
                    + ", then ".join(f"python tools/push.py {s}" for s in rest)
                )
            raise
    say("done")
    return 0


def main(argv: list[str] | None = None, repo: Path | None = None) -> int:
    """``tools/push.py``: ``repo`` is the checkout the script runs from (the default of ``--repo``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "fetch"):  # training on Kaggle
        from cellseg.kaggle import push_train

        return push_train.main(argv, repo)
    args = build_parser(argv[0] if argv and argv[0] in (*STEPS, "all") else None, repo).parse_args(argv)
    return report_errors(lambda: run(args))
