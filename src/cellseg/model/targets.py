"""Mask R-CNN training targets without full-frame copies of the ground truth.

torchvision builds two training targets from (N, H, W) full-frame tensors, and both cost memory
that grows with the number of cells times the input area:

* mask targets: the transform upsamples every ground-truth mask to the input scale in float32,
  then ``roi_heads.project_masks_on_boxes`` casts the whole stack to float again before its
  RoIAlign (937 cells at 1300 x 1760: two 8.6 GB copies);
* RPN anchor matching: ``box_iou(gt, anchors)`` builds (G, A, 2) intermediates for ~580,000
  anchors (several GB at ~470 cells per image) before the ``Matcher`` reduces them.

Here the same targets are built from small pieces:

* :func:`project_masks` keeps the masks uint8/bool at the resolution the data pipeline produced
  (a transform built for training leaves them at that resolution) and, for each matched
  proposal only, gathers the window RoIAlign reads from the nearest-upsampled mask (torch's own
  nearest index map), then runs torchvision's RoIAlign on that float window. The result is
  torchvision's target up to float rounding of the shifted box (< 1e-5).
* :func:`match_anchors` runs torchvision's ``Matcher`` over tiles of anchors (same IoU arithmetic,
  same argmax, same low-quality matches with ties), each against only the ground truths that reach
  into it: no (G, A) matrix, and ~15x less work on the CPU at ~500 cells.

:func:`cellseg.model.build.build_model` passes :func:`chunked_anchor_matching` and
:func:`source_mask_forward` to the RPN and RoI heads of a model built for training (parameters,
state-dict keys and inference are those of torchvision's parts); a model built for inference never
imports this module. Only public torchvision pieces are used (``RoIHeads`` methods,
``fastrcnn_loss``, ``roi_align``, ``Matcher``), present since torchvision 0.8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_area, roi_align

#: Float elements of the mask windows RoIAlign reads at once (64 MiB); larger sets go in groups.
MAX_WINDOW_ELEMENTS = 1 << 24
#: IoU elements per block of :func:`match_anchors` on a GPU (32 MiB of float32; ~4 such tensors live at once).
IOU_BLOCK_ELEMENTS = 1 << 23


def nearest_index(index: Tensor, in_size: int, out_size: int) -> Tensor:
    """Source index of each output index of ``F.interpolate(mode="nearest", size=...)`` along one axis.

    Args:
        index: int64 output indices in ``[0, out_size)``, any shape.
        in_size, out_size: the axis length before and after resizing.
    Returns:
        int64 tensor like ``index``: torch's ``min(floor(i * (in / out)), in - 1)`` in float32.
    """
    if in_size == out_size:
        return index
    if out_size == 2 * in_size:
        return index // 2
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    return torch.floor(index.to(torch.float32) * scale.to(index.device)).to(torch.int64).clamp_(max=in_size - 1)


def _groups(spans: Tensor, budget: int) -> list[Tensor]:
    """Split proposals into index groups whose (n, max h, max w) windows hold <= ``budget`` elements.

    spans: (P, 2) int64 on the CPU (window height, width). Returns a list of (n,) int64 CPU tensors.
    """
    hmax, wmax = (int(v) for v in spans.max(dim=0).values)
    if spans.shape[0] * hmax * wmax <= budget:
        return [torch.arange(spans.shape[0])]
    order = torch.argsort(spans[:, 0] * spans[:, 1], descending=True).tolist()
    groups: list[Tensor] = []
    current: list[int] = []
    gh = gw = 0
    for i in order:
        h, w = int(spans[i, 0]), int(spans[i, 1])
        nh, nw = max(gh, h), max(gw, w)
        if current and (len(current) + 1) * nh * nw > budget:
            groups.append(torch.tensor(current))
            current, nh, nw = [], h, w
        current.append(i)
        gh, gw = nh, nw
    groups.append(torch.tensor(current))
    return groups


def project_masks(
    gt_masks: Tensor,
    boxes: Tensor,
    matched_idxs: Tensor,
    image_size: tuple[int, int],
    size: int,
    max_elements: int = MAX_WINDOW_ELEMENTS,
) -> Tensor:
    """Mask targets of matched proposals, as torchvision computes them on upsampled masks.

    Equal (to float rounding) to ``project_masks_on_boxes(F.interpolate(gt_masks[:, None].float(),
    image_size, mode="nearest")[:, 0], boxes, matched_idxs, size)``, but only the window of the
    upsampled mask that RoIAlign reads is materialised, per proposal.

    Args:
        gt_masks: (N, h, w) uint8/bool ground-truth masks at the data pipeline's resolution.
        boxes: (P, 4) float xyxy proposals in the network input frame (``image_size``).
        matched_idxs: (P,) int64 index into ``gt_masks`` for each proposal.
        image_size: (H, W) of the network input before padding (the transform's ``image_sizes``).
        size: output side M (the mask head's resolution).
        max_elements: float elements of windows processed at once (memory cap).
    Returns:
        (P, M, M) float32 targets in [0, 1] on ``boxes.device``.
    """
    num = boxes.shape[0]
    if num == 0:
        return torch.zeros((0, size, size), dtype=torch.float32, device=boxes.device)
    height, width = int(image_size[0]), int(image_size[1])
    h0, w0 = int(gt_masks.shape[-2]), int(gt_masks.shape[-1])
    boxes = boxes.to(torch.float32)
    x1, y1, x2, y2 = boxes.unbind(1)
    # RoIAlign (aligned=False, spatial_scale 1) samples [x1, x1 + max(x2 - x1, 1)] and reads one pixel
    # past the last sample for its bilinear weights: a window of floor(end) - floor(start) + 2 pixels.
    x0 = x1.floor().clamp(0, width - 1)
    y0 = y1.floor().clamp(0, height - 1)
    xe = (x1 + (x2 - x1).clamp(min=1.0)).floor() + 2
    ye = (y1 + (y2 - y1).clamp(min=1.0)).floor() + 2
    spans = torch.stack([ye - y0, xe - x0], dim=1).clamp(min=1).to(torch.int64).cpu()  # one host sync
    offsets = torch.stack([x0, y0, x0, y0], dim=1)
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    out = torch.empty((num, size, size), dtype=torch.float32, device=boxes.device)
    for group in _groups(spans, max_elements):
        sel = group.to(boxes.device)
        hc, wc = (int(v) for v in spans[group].max(dim=0).values)
        # rows/cols of the upsampled frame (clamped at the border as RoIAlign clamps), then the
        # source pixel torch's nearest upsampling would copy there
        rows = (y0[sel, None] + torch.arange(hc, device=boxes.device)).clamp_(max=height - 1)
        cols = (x0[sel, None] + torch.arange(wc, device=boxes.device)).clamp_(max=width - 1)
        rows, cols = nearest_index(rows, h0, height), nearest_index(cols, w0, width)
        picked = gt_masks[matched_idxs[sel, None], rows]  # (n, hc, w0)
        windows = torch.gather(picked, 2, cols[:, None, :].expand(-1, hc, -1)).to(torch.float32)
        local = boxes[sel] - offsets[sel]
        rois = torch.cat([torch.arange(len(group), device=boxes.device, dtype=torch.float32)[:, None], local], dim=1)
        out[sel] = roi_align(windows[:, None], rois, (size, size), 1.0)[:, 0]
    return out


def mask_rcnn_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
    image_sizes: list[tuple[int, int]],
    dice: bool = False,
) -> dict[str, Tensor]:
    """torchvision's ``maskrcnn_loss`` with targets from :func:`project_masks`, and with ``dice``
    :func:`soft_dice_loss` on the same masks.

    Args:
        mask_logits: (P, C, M, M) logits of the positive proposals of all images.
        proposals: per image (P_i, 4) positive proposals in the input frame.
        gt_masks: per image (N_i, h_i, w_i) uint8/bool masks (any resolution; see project_masks).
        gt_labels: per image (N_i,) int64 classes.
        matched_idxs: per image (P_i,) int64 index of each proposal's ground truth.
        image_sizes: per image (H, W) of the network input.
        dice: also return ``loss_mask_dice``.
    Returns:
        ``loss_mask``: the mean binary cross-entropy over the logits of each proposal's class (0 with
        no proposal); with ``dice`` also ``loss_mask_dice``. Scalars.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, matched_idxs)], dim=0)
    targets = torch.cat(
        [project_masks(m, p, i, s, size) for m, p, i, s in zip(gt_masks, proposals, matched_idxs, image_sizes)],
        dim=0,
    )
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].float()  # fp32 as autocast would
    if targets.numel() == 0:
        loss = mask_logits.sum() * 0
    else:
        loss = F.binary_cross_entropy_with_logits(logits, targets)
    if not dice:
        return {"loss_mask": loss}
    return {"loss_mask": loss, "loss_mask_dice": soft_dice_loss(logits, targets)}


def soft_dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Mean over masks of 1 - soft Dice(sigmoid(logits), targets) (Milletari et al. 2016).

    Each mask counts once, whatever its size, and its pixels against its whole outline: the overlap
    the metric thresholds, where binary cross-entropy weighs every pixel alone.

    Args:
        logits: (P, M, M) mask logits.
        targets: (P, M, M) targets in [0, 1].
        smooth: added to the numerator and the denominator (an empty target and an empty prediction
            give Dice 1, and the gradient stays finite).
    Returns:
        scalar in [0, 1): 0 when every mask matches its target; 0 (with a gradient) when P = 0.
    """
    if targets.numel() == 0:
        return logits.sum() * 0
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    dice = (2 * (probs * targets).sum(1) + smooth) / (probs.sum(1) + targets.sum(1) + smooth)
    return (1 - dice).mean()


def source_mask_forward(
    heads: Any,
    features: dict[str, Tensor],
    proposals: list[Tensor],
    image_shapes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
    dice: bool = False,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Training forward of a torchvision ``RoIHeads`` (``heads``, with a mask branch) whose mask loss
    comes from :func:`mask_rcnn_loss`: ground-truth masks at any resolution, no full-stack float copy.
    Sampling, box loss and the returned loss keys are torchvision's; ``dice`` adds
    ``loss_mask_dice`` (``model.mask_loss: bce+dice``).

    The ``training_forward`` of :class:`cellseg.model.parts.MaskRoIHeads`.
    """
    proposals, matched_idxs, labels, regression_targets = heads.select_training_samples(proposals, targets)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_shapes))
    class_logits, box_regression = heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    positive = [torch.where(lab > 0)[0] for lab in labels]
    mask_proposals = [p[i] for p, i in zip(proposals, positive)]
    pos_matched = [m[i] for m, i in zip(matched_idxs, positive)]
    mask_features = heads.mask_head(heads.mask_roi_pool(features, mask_proposals, image_shapes))
    mask_logits = heads.mask_predictor(mask_features)
    mask_losses = mask_rcnn_loss(
        mask_logits,
        mask_proposals,
        [t["masks"] for t in targets],
        [t["labels"] for t in targets],
        pos_matched,
        list(image_shapes),
        dice=dice,
    )
    return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **mask_losses}


def _iou_block(gt: Tensor, gt_area: Tensor, anchors: Tensor, anchor_area: Tensor) -> Tensor:
    """(G, A) IoU with ``torchvision.ops.box_iou``'s arithmetic (bit-identical), fewer temporaries."""
    iw = torch.min(gt[:, None, 2], anchors[None, :, 2]) - torch.max(gt[:, None, 0], anchors[None, :, 0])
    ih = torch.min(gt[:, None, 3], anchors[None, :, 3]) - torch.max(gt[:, None, 1], anchors[None, :, 1])
    inter = iw.clamp_(min=0).mul_(ih.clamp_(min=0))
    del ih
    union = gt_area[:, None] + anchor_area[None, :]
    return inter.div_(union.sub_(inter))


def _tile_order(anchors: Tensor, chunk: int) -> Tensor:
    """A permutation of ``anchors`` that groups them into square tiles of ~``chunk`` anchors of one size
    (size class = round(log2(area))), so that a block of ``chunk`` consecutive anchors covers a small
    region. (A, 4) -> (A,) int64."""
    anchors = anchors.float()  # anchors come in the features' dtype: fp16 areas overflow under autocast
    wh = anchors[:, 2:] - anchors[:, :2]
    size_class = torch.log2((wh[:, 0] * wh[:, 1]).clamp(min=1e-6)).round().to(torch.int64)
    _, inverse, counts = torch.unique(size_class, return_inverse=True, return_counts=True)
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    low = centre.amin(dim=0)
    span = (centre.amax(dim=0) - low).clamp(min=1.0)
    side = torch.sqrt(chunk * span.prod() / counts.to(centre.dtype))  # per class: ~chunk anchors per tile
    tile = ((centre - low) / side[inverse, None]).floor().to(torch.int64).clamp_(0, (1 << 20) - 1)
    key = (inverse * (1 << 20) + tile[:, 1]) * (1 << 20) + tile[:, 0]
    return torch.argsort(key, stable=True)


def match_anchors(matcher, gt_boxes: Tensor, anchors: Tensor, chunk: int | None = None, tiled: bool = True) -> Tensor:
    """``matcher(box_iou(gt_boxes, anchors))`` computed over blocks of ``chunk`` anchors.

    Reproduces torchvision's ``Matcher`` exactly: best ground truth per anchor (first index on ties),
    ``BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``, and with ``allow_low_quality_matches`` every anchor
    that ties for some ground truth's best IoU keeps its best match. Each block computes IoU only
    with the ground truths that reach into the block's bounding extent: the others have IoU exactly 0
    there; the anchors are visited in square tiles of one size (:func:`_tile_order`), so a block sees
    a few of hundreds of cells. Blocks holding a best IoU are computed a second time, for those
    boxes only. Tiling only reorders the anchors: the result does not depend on it.

    Args:
        matcher: a ``torchvision.models.detection._utils.Matcher``.
        gt_boxes: (G, 4) float xyxy, G >= 1.
        anchors: (A, 4) float xyxy, A >= 1.
        chunk: anchors per block (default: 2048 on the CPU, else ``IOU_BLOCK_ELEMENTS // G`` within
            4096-65536).
        tiled: visit the anchors in tiles (False: in the given order; same result, more work).
    Returns:
        (A,) int64 matched ground-truth index, or -1 / -2.
    """
    if gt_boxes.numel() == 0 or anchors.numel() == 0:
        return matcher(torch.zeros((gt_boxes.shape[0], anchors.shape[0]), device=anchors.device))
    num, device = anchors.shape[0], anchors.device
    if chunk is None:  # CPU: small tiles (least work); GPU: fewer, larger blocks (fewer kernel launches)
        chunk = 2048 if device.type == "cpu" else min(65536, max(4096, IOU_BLOCK_ELEMENTS // gt_boxes.shape[0]))
    order = _tile_order(anchors, chunk) if tiled else None
    if order is not None:
        anchors = anchors[order]
    gt_area, anchor_area = box_area(gt_boxes), box_area(anchors)
    starts = list(range(0, num, chunk))
    # bounding extent of each block's anchors (the last block padded with its last anchor)
    padded = torch.cat([anchors, anchors[-1:].expand(len(starts) * chunk - num, 4)]).view(len(starts), chunk, 4)
    lo, hi = padded[:, :, :2].amin(dim=1), padded[:, :, 2:].amax(dim=1)  # (blocks, 2) each
    near = (gt_boxes[None, :, 2:] > lo[:, None]).all(dim=2) & (gt_boxes[None, :, :2] < hi[:, None]).all(dim=2)
    near_idx = [torch.nonzero(row)[:, 0].to(device) for row in near.cpu()]  # one host sync
    # no overlap at all: IoU 0 with every ground truth, whose argmax is the first one
    best = torch.zeros(num, dtype=gt_boxes.dtype, device=device)
    matches = torch.zeros(num, dtype=torch.int64, device=device)
    block_best = torch.zeros((len(starts), gt_boxes.shape[0]), dtype=gt_boxes.dtype, device=device)
    for b, s in enumerate(starts):
        g = near_idx[b]
        if g.numel() == 0:
            continue
        iou = _iou_block(gt_boxes[g], gt_area[g], anchors[s : s + chunk], anchor_area[s : s + chunk])
        value, index = iou.max(dim=0)
        best[s : s + chunk] = value
        matches[s : s + chunk] = torch.where(value > 0, g[index], 0)
        block_best[b, g] = iou.max(dim=1).values
        del iou
    all_matches = matches.clone() if matcher.allow_low_quality_matches else None
    matches[best < matcher.low_threshold] = matcher.BELOW_LOW_THRESHOLD
    matches[(best >= matcher.low_threshold) & (best < matcher.high_threshold)] = matcher.BETWEEN_THRESHOLDS
    if all_matches is not None:
        gt_best = block_best.max(dim=0).values
        if bool((gt_best == 0).any()):  # a box no anchor overlaps ties with every anchor: all keep their match
            matches = all_matches
        else:
            holds = (block_best == gt_best[None]).cpu()  # one host sync
            for b, s in enumerate(starts):
                g = torch.nonzero(holds[b])[:, 0].to(device)
                if g.numel() == 0:
                    continue
                iou = _iou_block(gt_boxes[g], gt_area[g], anchors[s : s + chunk], anchor_area[s : s + chunk])
                restore = torch.nonzero((iou == gt_best[g, None]).any(dim=0))[:, 0] + s
                matches[restore] = all_matches[restore]
    if order is None:
        return matches
    return torch.empty_like(matches).index_copy_(0, order, matches)


def chunked_anchor_matching(
    rpn: Any, anchors: list[Tensor], targets: list[dict[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """torchvision's ``RegionProposalNetwork.assign_targets_to_anchors`` for ``rpn`` with
    :func:`match_anchors` instead of the full (G, A) IoU matrix: the same labels and boxes.

    The ``anchor_matching`` of :class:`cellseg.model.parts.RPN`.

    Args:
        rpn: the RPN (its ``proposal_matcher`` decides).
        anchors: per image (A, 4) anchors.
        targets: per image a dict with ``boxes`` (G, 4).
    Returns:
        (labels per image: (A,) float32 1 / 0 / -1, matched ground-truth boxes per image: (A, 4)).
    """
    labels, matched_gt_boxes = [], []
    for anchors_per_image, target in zip(anchors, targets):
        gt_boxes = target["boxes"]
        if gt_boxes.numel() == 0:
            matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32, device=gt_boxes.device))
            labels.append(torch.zeros((anchors_per_image.shape[0],), dtype=torch.float32, device=gt_boxes.device))
            continue
        matched = match_anchors(rpn.proposal_matcher, gt_boxes, anchors_per_image)
        matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
        lab = (matched >= 0).to(torch.float32)
        lab[matched == rpn.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
        lab[matched == rpn.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
        labels.append(lab)
    return labels, matched_gt_boxes
