"""Half-precision inference for a built Mask R-CNN: which parts run under autocast, and how.

:func:`half_precision` is the one place that knows the model's layout for it. The convolutional
parts run under autocast (CUDA fp16 by default): backbone, RPN head, box head, and mask head + mask
predictor, the mask head's (N, 256, 14, 14) output staying half precision into the predictor (its
(N, 256, 28, 28) deconv would be GBs in float32 for 4 views x 1000 detections). Each part hands
float32 back, so anchors, box decoding, NMS and the paste stay float32.

    model = load_model(path, "cuda")[0]
    half_precision(model)          # in place; a second call changes nothing
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Autocast(nn.Module):
    """Runs ``module`` under autocast (``device_type``, ``dtype``) and returns float32 tensors (nested
    dict/list/tuple), or, with ``keep_half``, its half-precision outputs as they are (for a module whose
    only consumer runs under autocast too)."""

    def __init__(
        self,
        module: nn.Module,
        keep_half: bool = False,
        device_type: str = "cuda",
        dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.module = module
        self.keep_half = keep_half
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return out if self.keep_half else to_float(out)


def to_float(x: Any) -> Any:
    """``x`` with every floating tensor (nested in dicts, lists, tuples) cast to float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return type(x)((k, to_float(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(to_float(v) for v in x)
    return x


def half_precision(model: nn.Module, device_type: str = "cuda", dtype: torch.dtype = torch.float16) -> nn.Module:
    """Run the convolutional parts of a torchvision Mask R-CNN under autocast, in place (see the
    module docstring for which parts); returns ``model``. Idempotent. The wrapped parts' state-dict
    keys gain ``module.``: load the weights (and fold BatchNorms) before.
    """
    m: Any = model  # torchvision types a model's parts as nn.Module: attribute access on them is dynamic
    if isinstance(m.backbone, Autocast):
        return model
    rh = m.roi_heads
    m.backbone = Autocast(m.backbone, device_type=device_type, dtype=dtype)
    m.rpn.head = Autocast(m.rpn.head, device_type=device_type, dtype=dtype)
    rh.box_head = Autocast(rh.box_head, device_type=device_type, dtype=dtype)
    rh.mask_head = Autocast(rh.mask_head, keep_half=True, device_type=device_type, dtype=dtype)
    rh.mask_predictor = Autocast(rh.mask_predictor, device_type=device_type, dtype=dtype)
    return model


__all__ = ["Autocast", "half_precision", "to_float"]
