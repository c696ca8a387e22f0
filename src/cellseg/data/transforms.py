"""Training augmentation: geometric + photometric transforms and copy-paste.

:class:`~cellseg.config.experiment.AugmentConfig` (defined with the rest of the experiment config, so the
inference path never imports this module) is the ``augment`` section of an experiment config (plain typed fields with
defaults, loaded by :func:`cellseg.config.loader.from_dict`). Every field's "off" value is documented; the
defaults are a mild, always-safe policy (flips, rot90, small brightness/contrast changes).

:func:`build_transform` turns it into a ``torchvision.transforms.v2`` pipeline that maps one sample
``(image, target)`` with::

    image:  tv_tensors.Image (C, H, W) uint8 (C = 1: grey)
    target: {"boxes": tv_tensors.BoundingBoxes (N, 4) XYXY, "labels": (N,) int64,
             "masks": tv_tensors.Mask (N, H, W) uint8, ...other keys passed through}

to the same structure with the image float32 in [0, 1]. After the geometric ops the boxes are
recomputed from the masks (tight, exclusive max corner), instances under ``min_area`` pixels are
dropped, and ``v2.SanitizeBoundingBoxes`` removes anything degenerate; zero instances is fine.
Randomness comes from torch's global generator (seeded per DataLoader worker by torch).

Where the parts live (import them from there):

- :mod:`cellseg.data.geometric`: the geometric v2 transforms (:class:`~cellseg.data.geometric.RandomFlipRot90`,
  :class:`~cellseg.data.geometric.RandomScaleCrop`, :class:`~cellseg.data.geometric.TightBoxes`,
  :class:`~cellseg.data.geometric.SanitizeBoundingBoxes`);
- :mod:`cellseg.data.mask_stack`: the box-by-box operations on (N, H, W) mask stacks behind them
  (a 340-cell image carries a ~124 MB stack; benchmarks/bench_dataset.py has the figures);
- :mod:`cellseg.data.copy_paste`: :func:`~cellseg.data.copy_paste.copy_paste`, the pure numpy
  copy-paste step (Ghiasi et al. 2021), run by the dataset before the transforms.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cellseg.config.experiment import AugmentConfig
from cellseg.data.geometric import RandomFlipRot90, RandomScaleCrop, SanitizeBoundingBoxes, TightBoxes
from cellseg.errors import CellsegError

# Compatibility with torchvision 0.19 (the inference floor, pyproject.toml): it keeps query_size in
# v2._utils (public from 0.20), and cellseg.data.geometric reads v2.query_size when a transform runs.
if not hasattr(v2, "query_size"):
    from torchvision.transforms.v2._utils import query_size as _query_size

    v2.query_size = _query_size

#: Public names: this module's own, plus :class:`AugmentConfig`, :func:`build_transform`'s argument
#: (defined in :mod:`cellseg.config.experiment`).
__all__ = ["AugmentConfig", "RandomGamma", "build_transform"]


class RandomGamma(v2.Transform):
    """``F.adjust_gamma`` with gamma ~ U(lo, hi) on images (float in [0, 1] or uint8)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        self.gamma = tuple(gamma)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.gamma
        return {"gamma": lo + float(torch.rand(())) * (hi - lo)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.adjust_gamma, inpt, gamma=params["gamma"])

    # torchvision < 0.21 calls its hooks by their private names; later versions call the public ones.
    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)


def _is_range(r: tuple[float, float], neutral: float = 1.0) -> bool:
    return tuple(r) != (neutral, neutral)


def build_transform(cfg: AugmentConfig) -> v2.Compose:
    """The train-time pipeline for ``cfg`` (see the module docstring for the sample layout).

    Order: scale + crop, flips + rot90 (one :class:`RandomFlipRot90`) -> tight boxes, min area,
    SanitizeBoundingBoxes -> float
    [0, 1] -> brightness/contrast, gamma, noise. With ``cfg.enabled`` False only the dtype step and
    the box/area clean-up remain.
    """
    steps: list[v2.Transform] = []
    if cfg.enabled:
        # scale + crop first: the flips then copy only the cropped masks (a uniformly placed crop
        # commutes with the flips in distribution).
        if cfg.short_sides or _is_range(cfg.scale_range) or any(cfg.crop_size) or cfg.max_size:
            steps.append(RandomScaleCrop(cfg.scale_range, cfg.short_sides, cfg.max_size, cfg.crop_size))
        if cfg.hflip > 0 or cfg.vflip > 0 or cfg.rot90 > 0:
            steps.append(RandomFlipRot90(cfg.hflip, cfg.vflip, cfg.rot90))
    steps += [TightBoxes(cfg.min_area), SanitizeBoundingBoxes(min_size=1), v2.ToDtype(torch.float32, scale=True)]
    if cfg.enabled:
        if _is_range(cfg.brightness) or _is_range(cfg.contrast):
            steps.append(v2.ColorJitter(brightness=tuple(cfg.brightness), contrast=tuple(cfg.contrast)))
        if _is_range(cfg.gamma):
            steps.append(RandomGamma(cfg.gamma))
        if cfg.noise_sigma > 0 and cfg.noise_p > 0:
            if not hasattr(v2, "GaussianNoise"):
                raise CellsegError(f"augment.noise_sigma needs torchvision >= 0.20 (this is {torchvision.__version__})")
            steps.append(v2.RandomApply([v2.GaussianNoise(sigma=cfg.noise_sigma, clip=True)], p=cfg.noise_p))
    return v2.Compose(steps)
