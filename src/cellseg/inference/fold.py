"""BatchNorm folded into the convolution before it, for inference.

Under fp16 autocast a FrozenBatchNorm2d's float32 buffers turn half-precision activations back into
float32, so an unfolded R50 runs partly in float32; folded, it stays in half precision from end to end
(and in float32 on the CPU it does less work: one op per conv instead of two).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

_BATCHNORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold_into(conv: nn.Conv2d, bn: Any) -> bool:
    """Fold ``bn`` (eval-mode BatchNorm2d with running stats, or FrozenBatchNorm2d) into ``conv``'s
    weight and bias, in float64 then back to the weight's dtype. False (nothing changed) when ``bn``
    normalises with batch statistics or the channel counts differ."""
    if isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_var is None or bn.running_mean is None):
        return False
    n = conv.out_channels
    if bn.running_var.shape[0] != n:
        return False
    with torch.no_grad():
        f64: dict[str, Any] = {"dtype": torch.float64, "device": conv.weight.device}
        gamma = bn.weight.double() if bn.weight is not None else torch.ones(n, **f64)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros(n, **f64)
        scale = gamma * torch.rsqrt(bn.running_var.double() + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(n, **f64)
        w = conv.weight
        conv.weight.copy_((w.double() * scale.reshape(-1, 1, 1, 1)).to(w.dtype))
        folded = ((bias - bn.running_mean.double()) * scale + beta).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(folded, requires_grad=False)
        else:
            conv.bias.copy_(folded)
    return True


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it (in place), replacing it by
    ``nn.Identity``; returns how many were folded. Inference only: the model must be in eval mode.

    Two layouts are recognised, which cover torchvision's ResNet stems and blocks, their
    ``downsample``, and the v2 heads/FPN: ``(Conv2d, BatchNorm)`` adjacent in an ``nn.Sequential``
    (e.g. ``Conv2dNormActivation``), and sibling attributes ``convK`` / ``bnK``. Under fp16 autocast a
    FrozenBatchNorm2d's float32 buffers turn half-precision activations back into float32; folded, the
    backbone runs in half precision throughout. In float32 the outputs equal the unfolded model's up to
    rounding (tests/inference/test_forward.py).
    """
    count = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                conv_a, bn_b = children[a], children[b]
                if isinstance(conv_a, nn.Conv2d) and isinstance(bn_b, _BATCHNORMS) and _fold_into(conv_a, bn_b):
                    setattr(parent, b, nn.Identity())
                    count += 1
            continue
        for name, bn in children.items():
            if not (name.startswith("bn") and isinstance(bn, _BATCHNORMS)):
                continue
            conv = children.get("conv" + name[2:])
            if isinstance(conv, nn.Conv2d) and _fold_into(conv, bn):
                setattr(parent, name, nn.Identity())
                count += 1
    return count
