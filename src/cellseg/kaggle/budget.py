"""What a training push costs on Kaggle: the accelerator it asks for, the GPU-hours it may spend
against the weekly quota, and where it sits in the default recipe's budget (docs/KAGGLE.md).

Pure functions: no network, no torch. ``tools/push.py train`` prints :func:`plan_lines` before
anything is uploaded and refuses a plan over the remaining quota (:func:`quota_refusal`).

Accelerator ids are the ones the kaggle client documents for ``kernels push --accelerator`` and
``machine_shape`` (kaggle-cli docs/kernels.md, Feb 2026). The client's own help (kaggle 2.2.5,
``kaggle/cli.py``, ``param_kernel_acc``) says "'NvidiaTeslaT4' for GPU T4 x2", and its
``_RETIRED_ACCELERATORS`` (``kaggle/api/kaggle_api_extended.py``) calls NvidiaTeslaT4 "the default
GPU", on which a retired NvidiaTeslaP100 request runs instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The two-T4 machine the training configs are sized for (2 GPUs x train.batch_size 2 = 4 images/step).
DEFAULT_TRAIN_ACCELERATOR = "NvidiaTeslaT4"

#: Every id the client documents -> (GPUs per session, what it is). 0 GPUs: a TPU. Only the T4 count
#: is stated by the client; the kernel adapts to the GPUs torch sees, so a wrong count here only
#: changes the plan's step estimate.
ACCELERATORS: dict[str, tuple[int, str]] = {
    "NvidiaTeslaT4": (2, "2 x T4 16 GB"),
    "NvidiaTeslaT4Highmem": (2, "2 x T4 16 GB, more host memory (count unverified)"),
    "NvidiaL4": (4, "L4 24 GB, several (count unverified; some competitions only)"),
    "NvidiaL4X1": (1, "1 x L4 24 GB (some competitions only)"),
    "NvidiaTeslaA100": (1, "A100 (count unverified; some competitions only)"),
    "NvidiaH100": (1, "H100 (count unverified; some competitions only)"),
    "NvidiaRtxPro6000": (1, "RTX Pro 6000 (count unverified; some competitions only)"),
    "NvidiaTeslaP100": (2, "retired: runs on NvidiaTeslaT4"),
    "TpuV38": (0, "retired TPU"),
    "Tpu1VmV38": (0, "retired TPU"),
    "TpuV5E8": (0, "TPU v5e-8"),
    "TpuV6E8": (0, "TPU v6e-8"),
}
#: Ids the client warns about: the session runs on a replacement (kaggle_api_extended._RETIRED_ACCELERATORS).
RETIRED = ("NvidiaTeslaP100", "TpuV38", "Tpu1VmV38")

#: Images per epoch of the competition data and of LIVECell (FACTS: 606 train images; LIVECell train
#: 3,188 and val 570 images).
TRAIN_IMAGES = 606
LIVECELL_IMAGES = {"train": 3188, "val": 570, "test": 1564}
#: ESTIMATE, not a measurement (no T4 has been measured): seconds per optimiser step of the R50-FPN
#: configs (2 images per GPU at input_scale 2, AMP) on NvidiaTeslaT4, and seconds per image to
#: validate or predict with the default TTA. The one GPU figure is an H100's (benchmarks/README.md,
#: gpu_check.sh, 2026-12-05): 0.48 s/step with AMP, 0.27 without, 0.35 s/image for an R50 with 4 views;
#: a T4 is slower, so these are lower bounds there. Pass a T4's measured s/step as ``--sec-per-step``.
ESTIMATED_SEC_PER_STEP = 1.0
ESTIMATED_SEC_PER_IMAGE = 0.5


def accelerator_problems(acc: str) -> list[str]:
    """Problems of an accelerator id for a training kernel (one line each; empty when fine)."""
    if acc not in ACCELERATORS:
        return [f"accelerator {acc!r} is not one the kaggle client knows: {', '.join(ACCELERATORS)}"]
    gpus, what = ACCELERATORS[acc]
    if acc in RETIRED:
        return [f"accelerator {acc!r} is retired ({what}); ask for {DEFAULT_TRAIN_ACCELERATOR} instead"]
    if gpus == 0:
        return [f"accelerator {acc!r} is a TPU ({what}); cellseg trains on NVIDIA GPUs"]
    return []


def gpus_of(acc: str) -> int:
    """GPUs of one session on ``acc`` (1 for an unknown id)."""
    return ACCELERATORS.get(acc, (1, ""))[0] or 1


def images_per_epoch(use_train: bool, livecell: bool, livecell_splits: list[str], folds: int, fold: str) -> int:
    """Training images one epoch of a config sees: the fold's share of the 606 train images (all of
    them for ``fold == "full"``) plus the LIVECell splits it trains on."""
    n = 0
    if use_train:
        n += TRAIN_IMAGES if fold == "full" else round(TRAIN_IMAGES * (folds - 1) / max(folds, 1))
    if livecell:
        n += sum(LIVECELL_IMAGES.get(s, 0) for s in livecell_splits)
    return n


def steps(images: int, epochs: int, batch_per_gpu: int, gpus: int, max_steps: int = 0) -> int:
    """Optimiser steps of a run: epochs x ceil(images / global batch), capped by ``max_steps`` (0 = none)."""
    n = epochs * math.ceil(images / max(batch_per_gpu * gpus, 1))
    return min(n, max_steps) if max_steps else n


@dataclass
class Plan:
    """The GPU time of one ``push.py train``: ``kernels`` sessions of at most ``time_limit_s`` each."""

    accelerator: str
    kernels: int
    time_limit_s: float
    steps_per_kernel: int
    val_images_per_kernel: int
    sec_per_step: float | None = None  # measured; None: the estimate

    @property
    def cap_hours(self) -> float:
        """kernels x time limit: what the quota may be charged at most."""
        return self.kernels * self.time_limit_s / 3600

    @property
    def expected_hours_per_kernel(self) -> float:
        per_step = self.sec_per_step if self.sec_per_step is not None else ESTIMATED_SEC_PER_STEP
        sec = self.steps_per_kernel * per_step + self.val_images_per_kernel * ESTIMATED_SEC_PER_IMAGE
        return min(sec, self.time_limit_s) / 3600 if self.time_limit_s else sec / 3600


def plan_lines(plan: Plan) -> list[str]:
    """The plan as printed before anything is uploaded."""
    gpus, what = ACCELERATORS.get(plan.accelerator, (1, "?"))
    limit_h = plan.time_limit_s / 3600
    basis = (
        f"measured {plan.sec_per_step:g} s/step"
        if plan.sec_per_step is not None
        else f"ESTIMATE {ESTIMATED_SEC_PER_STEP:g} s/step (not measured on this accelerator; pass --sec-per-step)"
    )
    exp = plan.expected_hours_per_kernel
    return [
        f"accelerator: {plan.accelerator} ({what}; {gpus} GPU{'s' if gpus != 1 else ''} per session)",
        f"GPU quota: {plan.kernels} kernel{'s' if plan.kernels != 1 else ''} x {limit_h:.2f} h time limit "
        f"= {plan.cap_hours:.1f} GPU-hours at most",
        f"expected: {plan.steps_per_kernel} steps x {basis} + {plan.val_images_per_kernel} validation images "
        f"= {exp:.2f} h per kernel, {exp * plan.kernels:.1f} GPU-hours in all",
    ]


def quota_refusal(plan: Plan, allowed_h: float, left_h: float) -> str | None:
    """The one-line refusal when the plan's cap exceeds the quota left, else None."""
    if plan.cap_hours <= left_h:
        return None
    fit = max(left_h / plan.kernels, 0.0)
    return (
        f"the plan needs up to {plan.cap_hours:.1f} GPU-hours but the weekly GPU quota is {allowed_h:.1f} h "
        f"with {left_h:.1f} h left: lower --time-limit (at most {fit:.2f} h per kernel fits; expected "
        f"{plan.expected_hours_per_kernel:.2f} h), train fewer folds, or pass --ignore-quota"
    )


# ----------------------------------------------------------------------------------------------
# The default recipe (docs/KAGGLE.md, "GPU budget"): every figure an ESTIMATE until measured.


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # the config stem this stage trains ("" for inference stages)
    kernels: int
    steps: int  # per kernel (0 for inference)
    images: int  # images predicted or validated per kernel
    time_limit: str  # the --time-limit to push it with ("" for inference stages)
    week: int

    @property
    def hours(self) -> float:
        """Expected GPU-hours of the stage (ESTIMATE)."""
        sec = self.steps * ESTIMATED_SEC_PER_STEP + self.images * ESTIMATED_SEC_PER_IMAGE
        return self.kernels * sec / 3600


def _recipe() -> list[Stage]:
    gpus = gpus_of(DEFAULT_TRAIN_ACCELERATOR)
    fold_images = images_per_epoch(True, False, [], 5, "0")
    held_out = TRAIN_IMAGES - fold_images
    return [
        Stage(
            "LIVECell pretraining",
            "livecell_pretrain_r50",
            1,
            steps(LIVECELL_IMAGES["train"], 8, 2, gpus),
            8 * 160,
            "3h",
            1,
        ),  # fmt: skip
        Stage(
            "5 folds from LIVECell",
            "finetune_from_livecell_r50",
            5,
            steps(fold_images, 16, 2, gpus),
            16 * held_out,
            "1h30m",
            1,
        ),  # fmt: skip
        Stage("pseudo-labels (train_semi_supervised)", "", 1, 0, 1972, "", 1),
        Stage(
            "pseudo-label round, 5 folds",
            "finetune_from_livecell_r50",
            5,
            steps(round(fold_images * 1.5), 16, 2, gpus),
            16 * held_out,
            "2h",
            2,
        ),  # fmt: skip
        Stage("submission (hidden test, ~240 images)", "", 1, 0, 240 * 5, "", 2),
    ]


RECIPE = _recipe()


def recipe_lines(config_stem: str | None = None) -> list[str]:
    """The recipe's budget table (all of it, or the stages that train ``config_stem``), ESTIMATE-marked."""
    rows = [s for s in RECIPE if config_stem is None or s.config == config_stem]
    out = [
        f"recipe budget on {DEFAULT_TRAIN_ACCELERATOR} (ESTIMATE: {ESTIMATED_SEC_PER_STEP:g} s/step, "
        f"{ESTIMATED_SEC_PER_IMAGE:g} s/image; docs/KAGGLE.md):"
    ]
    for s in rows:
        how = f"--time-limit {s.time_limit}" if s.time_limit else "inference"
        out.append(f"  week {s.week}: {s.name}: {s.kernels} x {s.steps} steps, ~{s.hours:.1f} GPU-h expected, {how}")
    for week in sorted({s.week for s in rows}):
        total = sum(s.hours for s in RECIPE if s.week == week)
        out.append(f"  week {week} in all: ~{total:.1f} GPU-h expected of about 30 h")
    return out if rows else []
