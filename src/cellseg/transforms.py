"""Training augmentation: geometric + photometric transforms and copy-paste.

:class:`AugmentConfig` is the ``augment`` section of an experiment config (plain typed fields with
defaults, loaded by :func:`cellseg.config.from_dict`). Every field's "off" value is documented; the
defaults are a mild, always-safe policy (flips, rot90, small brightness/contrast changes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AugmentConfig:
    """Augmentation policy for training images (validation images are never augmented).

    Geometric ops act on the image, the masks and the boxes together; boxes are recomputed from the
    masks afterwards, and instances with fewer than ``min_area`` mask pixels are dropped.
    """

    #: Master switch: False gives the un-augmented image (still cheap: no copies of the masks).
    enabled: bool = True
    #: Probability of a horizontal / vertical flip.
    hflip: float = 0.5
    vflip: float = 0.5
    #: Probability of a rotation by 90 or 270 degrees (height and width swap). 0 = off.
    rot90: float = 0.5
    #: Multi-scale short side, Detectron2 ``ResizeShortestEdge`` style. ``short_sides`` non-empty:
    #: the short side is chosen from it ("choice"); otherwise it is the original short side times a
    #: factor drawn uniformly from ``scale_range`` ("range"). (1.0, 1.0) and [] = no resizing.
    scale_range: tuple[float, float] = (1.0, 1.0)
    short_sides: tuple[int, ...] = ()
    #: Cap on the long side after resizing (0 = no cap).
    max_size: int = 0
    #: Random crop (height, width) taken after resizing; a side larger than the image is clipped to
    #: the image (no padding). (0, 0) = no crop.
    crop_size: tuple[int, int] = (0, 0)
    #: Multiplicative brightness / contrast factors drawn uniformly from these ranges ((1, 1) = off).
    brightness: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.9, 1.1)
    #: Gamma drawn uniformly from this range, applied to the [0, 1] image ((1, 1) = off).
    gamma: tuple[float, float] = (1.0, 1.0)
    #: Gaussian noise: with probability ``noise_p`` add N(0, sigma) with sigma ~ U(0, noise_sigma)
    #: (image in [0, 1], result clipped). 0 = off.
    noise_sigma: float = 0.0
    noise_p: float = 0.5
    #: Copy-paste (Ghiasi et al. 2021): with probability ``copy_paste_p`` paste 1..``copy_paste_max_cells``
    #: cells of another training image (same cell type when ``copy_paste_same_type``) onto this one.
    copy_paste_p: float = 0.0
    copy_paste_max_cells: int = 20
    copy_paste_same_type: bool = True
    #: Instances with fewer mask pixels than this after augmentation are dropped.
    min_area: int = 8
