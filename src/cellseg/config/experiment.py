"""The typed experiment config: one YAML file per model (``configs/*.yaml``) loaded into
:class:`ExperimentConfig` with :func:`load_experiment` (``KEY=VALUE`` overrides, dotted keys).

Sections: ``model`` (:class:`ModelConfig`, everything needed to rebuild the network; it is stored in
every checkpoint), ``train`` (:class:`TrainConfig`: optimiser, schedule, AMP, validation),
``data`` (:class:`DataConfig`: which annotations, folds) and ``augment`` (:class:`AugmentConfig`,
applied by :mod:`cellseg.data.transforms`; defined here so that loading a checkpoint, which stores
the experiment config, never imports the augmentation code).

    cfg = load_experiment("configs/demo.yaml", ["train.epochs=3", "model.min_size=800"])

Validation thresholds (``train.val_thresholds``) are a :class:`cellseg.config.manifest.ClassThresholds`,
with the weights manifest's field names; the former ``train.val_score_thresh`` / ``val_mask_thresh`` /
``val_min_pixels`` keys still load, with a one-line deprecation notice on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cellseg import CELL_TYPES
from cellseg.config.loader import bounds, load_yaml, parse_duration
from cellseg.config.manifest import ClassThresholds
from cellseg.errors import CellsegError


@dataclass
class ModelConfig:
    """Everything needed to rebuild a torchvision Mask R-CNN (see :func:`cellseg.model.build.build_model`).

    Sizes are in pixels of the network input, i.e. after the ``min_size``/``max_size`` rescale
    (a 520 x 704 image with ``min_size: 1040`` is upscaled 2x; cells are then ~20-60 px).
    """

    name: str = "maskrcnn_r50_fpn"
    #: torchvision head variant: v1 = maskrcnn_resnet50_fpn, v2 = maskrcnn_resnet50_fpn_v2
    #: (2-conv RPN head, 4conv1fc box head and norm layers in FPN and heads).
    heads: Literal["v1", "v2"] = "v1"
    #: any torchvision ResNet: resnet18, resnet34, resnet50, resnet101, resnext50_32x4d, ...
    backbone: str = "resnet50"
    #: residual blocks per stage overriding the named ResNet's (e.g. [1, 1, 1, 1]: a slim "resnet10").
    backbone_blocks: list[int] = field(default_factory=list)
    #: backbone norm: frozen_bn (pretrained init, Detectron2 default), bn (train from scratch), gn.
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    #: ResNet stages trained (0-5, counted from the top as in torchvision); 5 = all.
    trainable_backbone_layers: int = 3
    #: ResNet stages that feed the FPN (1 = stride 4 ... 4 = stride 32); one extra max-pool level.
    returned_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    fpn_channels: int = 256
    #: 3 cell types + background.
    num_classes: int = 4
    class_names: list[str] = field(default_factory=lambda: list(CELL_TYPES))
    #: input rescale. input_scale > 0: every image (train and test) is scaled by this factor, so the
    #: augmentation's scale jitter/crops survive (e.g. 2.0: 520 x 704 -> 1040 x 1408). input_scale 0:
    #: torchvision's GeneralizedRCNNTransform, short side -> min_size, long side <= max_size.
    input_scale: float = 0.0
    min_size: int = 1040
    max_size: int = 1408
    #: per-channel normalisation of the (3, H, W) [0, 1] input (grey repeated to 3 channels).
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    #: anchor sizes per FPN level (len = len(returned_layers) + 1) and aspect ratios (h/w) for every level.
    anchor_sizes: list[list[int]] = field(default_factory=lambda: [[16], [32], [64], [128], [256]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 4000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 4000
    rpn_post_nms_top_n_test: int = 2000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    #: inference defaults (the predictor overrides score/nms/detections from the manifest).
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 1000
    #: RoIAlign sampling ratio of the box/mask poolers (torchvision: 2; Detectron2: 0 = adaptive).
    roi_sampling_ratio: int = 2
    mask_roi_size: int = 14
    #: box head width (torchvision: 1024) and mask head depth (torchvision: 4 convs).
    box_head_dim: int = 1024
    mask_head_convs: int = 4
    #: mask loss of training: ``bce`` (torchvision's binary cross-entropy on each positive proposal's
    #: M x M mask) or ``bce+dice``, which adds a soft Dice term on the same masks as its own loss,
    #: ``loss_mask_dice`` (weighted by ``train.loss_weights`` like the others). Dice counts a cell's
    #: pixels against its whole outline, not pixel by pixel: the IoU the metric thresholds.
    mask_loss: Literal["bce", "bce+dice"] = "bce"
    #: Detectron2-faithful options (cellseg.detectron2.modeling; all False = plain torchvision; set by
    #: ``cellseg convert-detectron2``). Stride of each ResNet stage's first block on its 1x1 conv
    #: (Detectron2 ``RESNETS.STRIDE_IN_1X1``, MSRA-style weights) instead of the 3x3 conv.
    stride_in_1x1: bool = False
    #: RoIAlign with half-pixel alignment (Detectron2 ``ROIAlignV2``) in Detectron2's pooler.
    roi_aligned: bool = False
    #: Detectron2's test-time behaviour: unrounded anchors at fixed strides, RPN and box filtering,
    #: FPN level assignment, resize rounding (``min_size`` 0 = no resize), mask pasting.
    detectron2_inference: bool = False

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes - 1:
            raise CellsegError(
                f"model.class_names has {len(self.class_names)} names but num_classes={self.num_classes} "
                "(classes + background)"
            )
        levels = len(self.returned_layers) + 1
        if len(self.anchor_sizes) != levels:
            raise CellsegError(
                f"model.anchor_sizes has {len(self.anchor_sizes)} levels but the FPN has {levels} "
                f"(returned_layers {self.returned_layers} + a max-pool level)"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise CellsegError("model.image_mean and model.image_std need 3 values (grey repeated to RGB)")


@dataclass
class TrainConfig:
    """Optimisation, schedule and validation. Iteration counts are optimiser steps."""

    epochs: int = field(default=24, metadata=bounds(1))
    #: images per process and step (DDP: global batch = batch_size x world size).
    batch_size: int = field(default=2, metadata=bounds(1))
    num_workers: int = field(default=2, metadata=bounds(0))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.02, metadata=bounds(0, lo_open=True))
    #: the global batch (processes x batch_size) ``lr`` is set for: lr scales linearly to the actual one.
    reference_batch: int = field(default=4, metadata=bounds(1))
    momentum: float = field(default=0.9, metadata=bounds(0, 1))
    weight_decay: float = field(default=1e-4, metadata=bounds(0))
    #: linear warm-up from lr * warmup_factor over warmup_iters steps.
    warmup_iters: int = field(default=500, metadata=bounds(0))
    warmup_factor: float = field(default=0.001, metadata=bounds(0, 1, lo_open=True))
    schedule: Literal["cosine", "step"] = "cosine"
    #: cosine: final lr = lr * min_lr_ratio. step: multiply by gamma at these fractions of training.
    min_lr_ratio: float = field(default=0.01, metadata=bounds(0, 1))
    steps: list[float] = field(default_factory=lambda: [0.75, 0.92], metadata=bounds(0, 1))
    gamma: float = field(default=0.1, metadata=bounds(0, lo_open=True))
    #: max global L2 norm of the gradients (0 = off).
    grad_clip: float = field(default=10.0, metadata=bounds(0))
    #: multiply these loss terms before they are summed (loss_classifier, loss_box_reg, loss_mask,
    #: loss_objectness, loss_rpn_box_reg; e.g. {loss_mask: 2.0}); missing terms: 1. The logged terms
    #: stay unweighted, the logged total is the weighted sum the optimiser sees.
    loss_weights: dict[str, float] = field(default_factory=dict, metadata=bounds(0))
    #: mixed precision on GPU (torch.autocast + GradScaler); always off on CPU.
    amp: bool = True
    seed: int = 0
    #: validate on the fold's hold-out every N epochs (and after the last); 0 = never.
    val_every: int = field(default=1, metadata=bounds(0))
    #: thresholds of the validation predictions, the same for every cell type (the manifest's
    #: per-class fields; defaults = the manifest's defaults). Validation runs the inference pipeline
    #: with :func:`cellseg.training.engine.validation_manifest` (identity view, default fusion and
    #: post-processing), so a checkpoint's validation score is what ``cellseg dry-run`` gives with
    #: that manifest.
    val_thresholds: ClassThresholds = field(default_factory=ClassThresholds)
    #: use at most this many hold-out images for validation (0 = all).
    val_max_images: int = field(default=0, metadata=bounds(0))
    #: stop after this many optimiser steps in total (0 = run all epochs); for smoke runs.
    max_steps: int = field(default=0, metadata=bounds(0))
    #: write best.pth weights in float16 (halves the size; loaded back as float32).
    half_best: bool = False
    #: DDP: convert BatchNorm layers to SyncBatchNorm (GPU only).
    sync_bn: bool = False
    #: torch CPU threads per process (0 = torch default).
    threads: int = field(default=0, metadata=bounds(0))
    #: print the losses every N steps to the log (0 = only the progress bar).
    log_every: int = field(default=50, metadata=bounds(0))
    #: wall-clock budget of one ``train()`` call (``11h30m``, ``45m``, seconds; None or 0 = none). Before
    #: each epoch the run stops cleanly (last.pth + metrics of the epoch just done, resumable with
    #: ``--resume``) when the longest epoch so far (training + validation) would end past it. A Kaggle
    #: GPU session ends at 12 h: ``tools/push.py train`` sets 11h30m. Parsed when loaded: seconds here.
    time_limit: float | None = field(default=None, metadata={"parse": parse_duration, **bounds(0)})


@dataclass
class DataConfig:
    """Which annotations train the model and how the hold-out is chosen (see :mod:`cellseg.data.folds`)."""

    #: fill holes of train.csv masks (broken astro outlines) before training.
    fill_holes: bool = True
    #: extra train.csv-format files (e.g. pseudo-labels), image PNGs found next to them or in the data dir.
    extra_csv: list[str] = field(default_factory=list)
    #: extra COCO instance json files (e.g. LIVECell).
    coco_json: list[str] = field(default_factory=list)
    folds: int = field(default=5, metadata=bounds(2))
    fold_seed: int = 0
    #: a folds CSV written by `cellseg folds` (id, sample_id, cell_type, fold); when set it defines the
    #: folds and ``folds`` / ``fold_seed`` are unused. Empty: folds made from ``folds`` and ``fold_seed``.
    folds_csv: str = ""
    #: extra items per epoch as a fraction of the train images (None = every extra image once per epoch).
    extra_ratio: float | None = field(default=None, metadata=bounds(0))
    #: folder of the COCO json images when not beside the json; class of COCO images without a cell-type name.
    coco_images_dir: str | None = None
    coco_cell_type: str = "shsy5y"
    #: per-cell-type repeat factor of the train.csv images in every epoch (e.g. {shsy5y: 2.0, astro: 2.0}
    #: to balance a cort-heavy set; see :func:`cellseg.data.dataset.repeat_by_type`); missing types: 1.
    type_repeat: dict[str, float] = field(default_factory=dict, metadata=bounds(0))
    #: class of COCO / LIVECell annotations: category name or cell line (file-name prefix) -> a name of
    #: model.class_names, "*" = any other; every line must be covered. Empty: the category name if it is a
    #: cell type, else a cell-type file-name prefix, else coco_cell_type (see cellseg.data.coco.resolve_class).
    coco_class_map: dict[str, str] = field(default_factory=dict)
    #: train on the train.csv images (false: LIVECell-only pretraining).
    use_train: bool = True
    #: LIVECell root (LIVECell_dataset_2021): relative to --data, else to the working directory, or
    #: absolute; "" = not used. See cellseg.data.livecell.
    livecell: str = ""
    #: LIVECell splits added to training (train, val, test).
    livecell_splits: list[str] = field(default_factory=lambda: ["train"])
    #: LIVECell split validated on instead of the competition hold-out, scored per cell line ("" = the fold).
    livecell_val: str = ""


@dataclass
class AugmentConfig:
    """Augmentation policy for training images (validation images are never augmented).

    Geometric ops act on the image, the masks and the boxes together; boxes are recomputed from the
    masks afterwards, and instances with fewer than ``min_area`` mask pixels are dropped.
    """

    #: Master switch: False gives the un-augmented image (still cheap: no copies of the masks).
    enabled: bool = True
    #: Probability of a horizontal / vertical flip.
    hflip: float = field(default=0.5, metadata=bounds(0, 1))
    vflip: float = field(default=0.5, metadata=bounds(0, 1))
    #: Probability of a rotation by 90 or 270 degrees (height and width swap). 0 = off.
    rot90: float = field(default=0.5, metadata=bounds(0, 1))
    #: Multi-scale short side, Detectron2 ``ResizeShortestEdge`` style. ``short_sides`` non-empty:
    #: the short side is chosen from it ("choice"); otherwise it is the original short side times a
    #: factor drawn uniformly from ``scale_range`` ("range"). (1.0, 1.0) and [] = no resizing.
    scale_range: tuple[float, float] = (1.0, 1.0)
    short_sides: tuple[int, ...] = ()
    #: Cap on the long side after resizing (0 = no cap).
    max_size: int = field(default=0, metadata=bounds(0))
    #: Random crop (height, width) taken after resizing; a side larger than the image is clipped to
    #: the image (no padding). (0, 0) = no crop.
    crop_size: tuple[int, int] = (0, 0)
    #: Multiplicative brightness / contrast factors drawn uniformly from these ranges ((1, 1) = off).
    brightness: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.9, 1.1)
    #: Gamma drawn uniformly from this range, applied to the [0, 1] image ((1, 1) = off).
    gamma: tuple[float, float] = (1.0, 1.0)
    #: Gaussian noise: with probability ``noise_p`` add N(0, noise_sigma) to the [0, 1] image (result
    #: clipped to [0, 1]). 0 = off.
    noise_sigma: float = field(default=0.0, metadata=bounds(0))
    noise_p: float = field(default=0.5, metadata=bounds(0, 1))
    #: Copy-paste (Ghiasi et al. 2021): with probability ``copy_paste_p`` paste 1..``copy_paste_max_cells``
    #: cells of another training image (same cell type when ``copy_paste_same_type``) onto this one.
    copy_paste_p: float = field(default=0.0, metadata=bounds(0, 1))
    copy_paste_max_cells: int = field(default=20, metadata=bounds(0))
    copy_paste_same_type: bool = True
    #: Instances with fewer mask pixels than this after augmentation are dropped.
    min_area: int = field(default=8, metadata=bounds(0))


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


#: former keys (section, key) -> their place now (section, key, field); see :func:`upgrade_keys`.
RENAMED: dict[tuple[str, str], tuple[str, str, str]] = {
    ("train", "val_score_thresh"): ("train", "val_thresholds", "score"),
    ("train", "val_mask_thresh"): ("train", "val_thresholds", "mask_threshold"),
    ("train", "val_min_pixels"): ("train", "val_thresholds", "min_pixels"),
}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def upgrade_keys(data: dict, where: str, notice: Callable[[str], None] = _stderr) -> dict:
    """Move the former keys of :data:`RENAMED` in a raw config dict to their new place (in place).

    Args:
        data: the mapping of a config file (or of a checkpoint's stored experiment).
        where: the file, for the notice.
        notice: receives one line naming every moved key (default: printed to stderr).

    Returns:
        ``data``. A key given both ways is an error (CellsegError).
    """
    moved = []
    for (section, key), (new_section, new_key, new_field) in RENAMED.items():
        sec = data.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        target = data.setdefault(new_section, {}).setdefault(new_key, {})
        if not isinstance(target, dict):
            raise CellsegError(f"{where}: {new_section}.{new_key}: expected a mapping")
        if new_field in target:
            raise CellsegError(f"{where}: {section}.{key} and {new_section}.{new_key}.{new_field} both given")
        target[new_field] = sec.pop(key)
        moved.append(f"{section}.{key} -> {new_section}.{new_key}.{new_field}")
    if moved:
        notice(f"{where}: deprecated config key(s) {', '.join(moved)}; rename them")
    return data


def upgrade_overrides(overrides: list[str], notice: Callable[[str], None] = _stderr) -> list[str]:
    """``KEY=VALUE`` overrides with the former keys of :data:`RENAMED` renamed (one notice line)."""
    out, moved = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        target = RENAMED.get((parts[0], parts[1])) if sep and len(parts) == 2 else None
        if target is not None:
            new_key = ".".join(target)
            out.append(f"{new_key}={value}")
            moved.append(f"{key.strip()} -> {new_key}")
        else:
            out.append(item)
    if moved:
        notice(f"command-line override(s): deprecated key(s) {', '.join(moved)}; rename them")
    return out


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config with ``KEY=VALUE`` overrides (e.g. ``train.lr=0.01``).

    Former key names (:data:`RENAMED`, in the file or in an override) are moved to their new place
    with a one-line notice on stderr. Errors (unknown keys, wrong types) name the file or the override.
    """
    return load_yaml(
        ExperimentConfig,
        path,
        upgrade_overrides(overrides or []),
        what="an experiment config (YAML, e.g. configs/demo.yaml)",
        upgrade=lambda data: upgrade_keys(data, str(path)),
    )
