"""Dropout that costs O(p N) random numbers instead of O(N) on the CPU.

``nn.Dropout`` draws one Bernoulli number per activation. On the CPU that draw is serial
(one Mersenne-Twister stream) and, at the small rates GaMPEN uses (paper grid 7e-4 ... 0.2),
it is the single largest cost of a training step or an MC-dropout pass after the
convolutions. A Bernoulli(p) sequence can be drawn exactly from the gaps between its ones,
which are i.i.d. Geometric(p): a rate-p dropout of N activations then needs ~p N random
numbers, a scale and ~p N scattered writes.

:class:`SparseDropout` is an ``nn.Dropout`` (so ``model.eval()``, Monte-Carlo mode switches
and ``isinstance`` checks treat it as one) that takes this path on the CPU for
``0 < p <= SPARSE_MAX_RATE`` and is plain ``nn.Dropout`` otherwise (CUDA's Philox dropout is
already fast). Same distribution, same scaling ``1 / (1 - p)``; not the same random numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Above this rate the gaps are short and plain dropout is as fast.
SPARSE_MAX_RATE = 0.25


def drop_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices in ``[0, n)`` of the elements a rate-``p`` dropout zeroes (int64, sorted).

    Each index is in the result independently with probability ``p``: the result is the set
    of ones of ``n`` Bernoulli(p) trials, drawn as cumulative sums of Geometric(p) gaps from
    torch's default generator (seed it with ``torch.manual_seed``).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop_positions: p must lie in (0, 1), got {p}")
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)
    log_q = math.log1p(-p)
    parts, last = [], -1
    while last < n:
        # Inverse-CDF Geometric(p) gaps (trials up to and including the next one): with
        # U uniform in (0, 1], 1 + floor(log U / log(1 - p)).
        u = torch.rand(chunk, dtype=torch.float64, device=device).neg_().add_(1.0)
        gaps = u.log_().div_(log_q).floor_().add_(1.0).to(torch.int64)
        positions = torch.cumsum(gaps, 0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = torch.cat(parts)
    return positions[positions < n]


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A flat view of a dense tensor in storage order (any memory format)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _SparseDropoutFunction(torch.autograd.Function):
    # Dropped elements are chosen in storage order (the elements are i.i.d., so any order
    # is as good), which keeps channels-last tensors channels-last and avoids index maths.
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        out = x * (1.0 / (1.0 - p))  # a fresh dense tensor in x's memory format
        positions = drop_positions(out.numel(), p, out.device)
        _memory_order(out).index_fill_(0, positions, 0.0)
        ctx.p, ctx.layout = p, (out.shape, out.stride())
        ctx.save_for_backward(positions)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        shape, stride = ctx.layout
        grad_in = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        torch.mul(grad, 1.0 / (1.0 - ctx.p), out=grad_in)
        _memory_order(grad_in).index_fill_(0, positions, 0.0)
        return grad_in, None


class SparseDropout(nn.Dropout):
    """``nn.Dropout(p)`` with the sparse-gap sampler on the CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and 0.0 < self.p <= SPARSE_MAX_RATE
            and x.device.type == "cpu"
            and not self.inplace
        ):
            return _SparseDropoutFunction.apply(x, self.p)
        return F.dropout(x, self.p, self.training, self.inplace)
