"""The straightforward GaMPEN the benchmarks compare against.

The platform's :class:`gampen_ml.model.GaMPEN` computes the same function as a first
implementation would, with two CPU-side shortcuts: the STN's sampling grid is built as one
broadcast product instead of ``F.affine_grid`` (``ZoomSTN.forward``) and dropout masks are
drawn from geometric gaps (:class:`gampen_ml.model.dropout.SparseDropout`).
:func:`reference_model` undoes both on a copy: ``F.affine_grid`` with the full ``theta`` and
torch's ``nn.Dropout``, same weights, so a benchmark's reference loop runs the network the
way the original code wrote it.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

from gampen_ml.model import GaMPEN
from gampen_ml.model.dropout import SparseDropout


def _affine_grid_stn_forward(stn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = stn.scale(x)
    zeros = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zeros, zeros], 1), torch.stack([zeros, s, zeros], 1)], 1)
    side = stn.output_px * stn.supersample
    grid = F.affine_grid(
        theta.to(x.dtype), [x.shape[0], x.shape[1], side, side], align_corners=False
    )
    cropped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if stn.supersample > 1:
        cropped = F.avg_pool2d(cropped, stn.supersample)
    return cropped, s


def reference_model(model: GaMPEN) -> GaMPEN:
    """A copy of ``model`` with ``F.affine_grid`` in the STN and plain ``nn.Dropout`` layers."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, SparseDropout):
            module.__class__ = nn.Dropout
    ref.stn.forward = types.MethodType(_affine_grid_stn_forward, ref.stn)
    return ref
