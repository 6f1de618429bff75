"""The GaMPEN network: a zoom-only Spatial Transformer followed by a VGG-16 with dropout.

The layer lists below are Table 3 of Ghosh et al. (2022), written as data in the style of
torchvision's ``models/vgg.py``: integers are 3x3 convolutions (ReLU) of that many filters,
``"M"`` is a 2x2 max-pool of stride 2. Every width is multiplied by
``NetworkConfig.width_multiplier`` (1.0 in the ``paper`` profile, so the paper network is
reproduced exactly).

Dropout sits exactly where Table 3 puts it: before every convolution except the first, and
after each of the two hidden fully connected layers. Because the first convolution (and the
STN before it) see no dropout, :meth:`GaMPEN.deterministic_head` can be evaluated once per
galaxy and :meth:`GaMPEN.stochastic_tail` T times for Monte-Carlo dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gampen_ml.config import NetworkConfig
from gampen_ml.model.dropout import SparseDropout

#: VGG-16 convolution blocks (Table 3, rows 2-31 of the downstream CNN).
VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

#: STN localization network (Table 3, upper part): (filters, kernel) convolutions, each
#: followed by ReLU and a 3x3 max-pool of stride 2, then FC 32 (ReLU) and FC 1 (linear).
STN_CONVS: tuple[tuple[int, int], ...] = ((64, 11), (96, 9))
STN_HIDDEN_FC = 32
STN_POOL_KERNEL, STN_POOL_STRIDE = 3, 2


def scaled_width(width: int, multiplier: float) -> int:
    """A layer width times ``multiplier``, rounded, at least 1."""
    return max(1, round(width * multiplier))


def _conv_out(size: int, kernel: int, stride: int = 1) -> int:
    return (size - kernel) // stride + 1


class ZoomSTN(nn.Module):
    """Spatial transformer that predicts one zoom factor ``s`` per image (paper eq. 4).

    The affine matrix is ``[[s, 0, 0], [0, s, 0]]``: ``s = 1`` keeps the whole frame,
    ``s < 1`` keeps the central fraction ``s`` of each side. The localization network sees
    the image average-pooled by ``localization_pool``; the bilinear sampler reads the
    full-resolution image and writes ``output_px x output_px`` pixels.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for one band).
    image_px : int
        Side of the input images in pixels.
    output_px : int
        Side of the sampled output in pixels.
    width_multiplier : float
        Scales the localization convolution widths (64, 96).
    localization_pool : int
        Average-pooling factor applied before the localization network (1 = none).
    supersample : int
        Sample a grid this many times finer than the output and average-pool it back
        (anti-aliased area resampling; 1 = plain bilinear, as in the paper).
    zoom_range : (float, float) or None
        ``(lo, hi)`` with ``lo < 1 < hi``: ``s = lo + (hi - lo) sigmoid(z)`` of the regressor
        output ``z``, so no step can zoom the grid off the frame (``NetworkConfig``);
        ``None``: ``s = z`` (unbounded, as in the paper).
    """

    def __init__(
        self,
        in_channels: int,
        image_px: int,
        output_px: int,
        width_multiplier: float = 1.0,
        localization_pool: int = 1,
        supersample: int = 1,
        zoom_range: tuple[float, float] | None = None,
        zoom_init: float = 1.0,
    ) -> None:
        super().__init__()
        if zoom_range is not None and not 0 < zoom_range[0] < 1 < zoom_range[1]:
            raise ValueError(f"ZoomSTN: zoom_range must satisfy 0 < lo < 1 < hi, got {zoom_range}")
        self.zoom_range = None if zoom_range is None else tuple(float(v) for v in zoom_range)
        self.output_px = output_px
        self.localization_pool = localization_pool
        self.supersample = supersample
        layers: list[nn.Module] = []
        channels, size = in_channels, image_px // localization_pool
        for filters, kernel in STN_CONVS:
            filters = scaled_width(filters, width_multiplier)
            layers += [
                nn.Conv2d(channels, filters, kernel),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(STN_POOL_KERNEL, STN_POOL_STRIDE),
            ]
            size = _conv_out(_conv_out(size, kernel), STN_POOL_KERNEL, STN_POOL_STRIDE)
            channels = filters
        if size < 1:
            raise ValueError(
                f"ZoomSTN: image_px={image_px} pooled by localization_pool={localization_pool} "
                "is too small for the localization convolutions (need >= 41 px after pooling)"
            )
        self.localization = nn.Sequential(*layers)
        self.regressor = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, STN_HIDDEN_FC),
            nn.ReLU(inplace=True),
            nn.Linear(STN_HIDDEN_FC, 1),
        )
        # Start at s = zoom_init for every image (1: the identity, Jaderberg et al. 2015).
        nn.init.zeros_(self.regressor[-1].weight)
        if self.zoom_range is None:
            nn.init.constant_(self.regressor[-1].bias, zoom_init)
        else:
            lo, hi = self.zoom_range
            if not lo < zoom_init < hi:
                raise ValueError(f"ZoomSTN: zoom_init {zoom_init} outside zoom_range {zoom_range}")
            nn.init.constant_(
                self.regressor[-1].bias, math.log((zoom_init - lo) / (hi - zoom_init))
            )

    def _resampling_matrix(
        self, s: torch.Tensor, image_px: int, like: torch.Tensor
    ) -> torch.Tensor:
        """``(N, P, S)`` weights ``A``: output row ``j`` = sum over ``i`` of ``A[n, j, i]`` x row ``i``.

        ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) at the zoom grid
        ``u_j = s (2 j + 1) / side - 1`` reads input pixel coordinate
        ``p_j = ((u_j + 1) S - 1) / 2`` with bilinear weights on its two neighbouring pixels
        (pixels beyond the edge simply have no weight: zero padding); ``supersample``
        rows are then averaged (the area resampling of ``avg_pool2d``).
        """
        side = self.output_px * self.supersample
        n = len(s)
        c = torch.arange(side, device=like.device, dtype=like.dtype).mul_(2.0).add_(1.0)
        c = c.div_(side).sub_(1.0)
        p = ((s.to(like.dtype)[:, None] * c + 1.0) * image_px - 1.0) / 2.0  # (N, side)
        # Weights 1 - frac and frac on pixels floor(p) and floor(p) + 1, scattered into the
        # (P, S) matrix (supersampled rows add into their output row with weight 1 /
        # supersample). A neighbour off the frame gets weight 0: zero padding. Written with
        # floor, so the gradient at an integer p is grid_sample's one-sided difference (a
        # tent max(0, 1 - |p - i|) has slope 0 there, and at s = 1 with output = input size,
        # the paper's STN at initialisation, every p is an integer).
        left = torch.floor(p).detach()
        frac = p - left
        columns = torch.stack([left, left + 1.0], dim=-1)  # (N, side, 2)
        values = torch.stack([1.0 - frac, frac], dim=-1) / self.supersample
        values = values * ((columns >= 0) & (columns <= image_px - 1)).to(like.dtype)
        rows = torch.arange(side, device=like.device) // self.supersample
        flat = rows[None, :, None] * image_px + columns.clamp(0, image_px - 1).long()
        weights = torch.zeros(n, self.output_px * image_px, device=like.device, dtype=like.dtype)
        weights = weights.scatter_add(1, flat.view(n, -1), values.view(n, -1))
        return weights.view(n, self.output_px, image_px)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Zoom factor ``s`` per image: ``(N, C, S, S)`` -> ``(N,)``."""
        if self.localization_pool > 1:
            x = F.avg_pool2d(x, self.localization_pool)
        z = self.regressor(self.localization(x)).squeeze(1)
        if self.zoom_range is None:
            return z
        lo, hi = self.zoom_range
        return lo + (hi - lo) * torch.sigmoid(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop ``(N, C, S, S)`` to ``(N, C, P, P)``; also return the scales ``(N,)``."""
        s = self.scale(x)
        # The zoom grid is separable: bilinear sampling (and the supersampling average) of an
        # image is A X A^T with A the (P, S) bilinear-weight matrix of the zoom. Two small
        # matrix products replace F.affine_grid + F.grid_sample + avg_pool2d (the same
        # numbers, the same gradient in s) at a fraction of the cost on a CPU. In fp32 even
        # under autocast, as F.grid_sample runs.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            rows = self._resampling_matrix(s, x.shape[-2], x)[:, None]  # (N, 1, P, H)
            cols = (
                rows
                if x.shape[-1] == x.shape[-2]
                else self._resampling_matrix(s, x.shape[-1], x)[:, None]
            )
            cropped = rows @ x @ cols.transpose(-1, -2)
        return cropped, s


class GaMPEN(nn.Module):
    """STN + VGG-16 with Monte-Carlo dropout; 9 outputs ``[mu(3) | log var(3) | L(3)]``.

    Parameters
    ----------
    network_cfg : NetworkConfig
        Widths and sizes (``paper`` = Table 3).
    dropout_rate : float
        Probability of zeroing a unit in every dropout layer, in [0, 1).
    image_px : int
        Side of the input images, pixels.

    Notes
    -----
    Input: ``(N, in_channels, image_px, image_px)`` float32, arsinh-scaled images.
    Output: ``(N, n_outputs)``; see :mod:`gampen_ml.model.loss` for the layout.
    """

    def __init__(self, network_cfg: NetworkConfig, dropout_rate: float, image_px: int) -> None:
        super().__init__()
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"GaMPEN: dropout_rate must lie in [0, 1), got {dropout_rate}")
        self.network_cfg = network_cfg
        self.dropout_rate = float(dropout_rate)
        self.image_px = int(image_px)
        m = network_cfg.width_multiplier
        self.stn = ZoomSTN(
            network_cfg.in_channels,
            image_px,
            network_cfg.stn_output_px,
            width_multiplier=m,
            localization_pool=network_cfg.stn_localization_pool,
            supersample=network_cfg.stn_supersample,
            zoom_range=network_cfg.stn_zoom_range,
            zoom_init=network_cfg.stn_zoom_init,
        )
        widths = [scaled_width(v, m) if isinstance(v, int) else v for v in VGG16_LAYERS]
        first = widths[0]
        # Deterministic part: the first convolution has no dropout before it (Table 3).
        bn = network_cfg.batch_norm

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if bn else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU(inplace=True)]

        self.first_conv = nn.Sequential(*conv(network_cfg.in_channels, first))
        layers: list[nn.Module] = []
        channels, size = first, network_cfg.stn_output_px
        for v in widths[1:]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                layers += [SparseDropout(dropout_rate), *conv(channels, v)]
                channels = v
        if size < 1:
            raise ValueError(
                f"GaMPEN: stn_output_px={network_cfg.stn_output_px} is too small for five "
                "2x2 max-pools (need >= 32)"
            )
        self.features = nn.Sequential(*layers)
        fc = network_cfg.fc_width
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, fc),
            nn.ReLU(inplace=True),
            SparseDropout(dropout_rate),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=True),
            SparseDropout(dropout_rate),
            nn.Linear(fc, network_cfg.n_outputs),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation; the STN's identity init is kept.
        for module in [*self.first_conv, *self.features, *self.classifier]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def deterministic_head(self, x: torch.Tensor) -> torch.Tensor:
        """STN crop + first convolution + ReLU: ``(N, C, S, S)`` -> ``(N, w, P, P)``.

        No dropout acts here, so for Monte-Carlo dropout it is computed once per galaxy.
        """
        cropped, _ = self.stn(x)
        return self.first_conv(cropped)

    def stochastic_tail(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the first convolution: ``(N, w, P, P)`` -> ``(N, 9)``."""
        return self.classifier(self.features(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, S, S)`` arsinh images -> ``(N, 9)`` outputs in the scaled label space."""
        return self.stochastic_tail(self.deterministic_head(x))
