"""GaMPEN network: Table-3 layers, parameter counts, STN identity, head/tail split."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from gampen_ml.config import PAPER, QUICK, NetworkConfig
from gampen_ml.model import GaMPEN, gaussian_nll

SMALL = NetworkConfig(
    width_multiplier=0.0625, fc_width=16, stn_output_px=32, stn_localization_pool=1
)


def _conv(cin, cout, k):
    return cin * cout * k * k + cout


def _fc(nin, nout):
    return nin * nout + nout


def test_paper_network_is_table_3():
    model = GaMPEN(PAPER.network, 0.1, 239)
    # STN (Table 3, upper part): 239 -> conv11 229 -> pool 114 -> conv9 106 -> pool 52.
    stn_convs = [m for m in model.stn.localization if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in stn_convs] == [(64, (11, 11)), (96, (9, 9))]
    stn_pools = [m for m in model.stn.localization if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in stn_pools] == [(3, 2), (3, 2)]
    stn_fcs = [m for m in model.stn.regressor if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in stn_fcs] == [(96 * 52 * 52, 32), (32, 1)]
    # Downstream CNN: 13 convs 3x3 stride 1, 5 max-pools 2/2, FC 4096 4096 9.
    convs = [model.first_conv[0]] + [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [
        (512 * 7 * 7, 4096),
        (4096, 4096),
        (4096, 9),
    ]
    expected = (
        _conv(1, 64, 11) + _conv(64, 96, 9) + _fc(96 * 52 * 52, 32) + _fc(32, 1)
        + _conv(1, 64, 3) + _conv(64, 64, 3) + _conv(64, 128, 3) + _conv(128, 128, 3)
        + _conv(128, 256, 3) + 2 * _conv(256, 256, 3) + _conv(256, 512, 3) + 5 * _conv(512, 512, 3)
        + _fc(25088, 4096) + _fc(4096, 4096) + _fc(4096, 9)
    )  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == expected == 143_108_586


def _layer_sequence(model: GaMPEN) -> list[str]:
    names = {nn.Conv2d: "C", nn.MaxPool2d: "M", nn.Dropout: "D", nn.Linear: "F"}
    layers = [*model.first_conv, *model.features, *model.classifier]
    return [names[k] for m in layers for k in names if isinstance(m, k)]


def test_dropout_positions_match_table_3():
    model = GaMPEN(PAPER.network, 0.05, 239)
    # Table 3 rows 2-36: conv, (dropout conv) ..., pools, FC dropout FC dropout FC.
    expected = "C DC M DC DC M DC DC DC M DC DC DC M DC DC DC M F DF DF".replace(" ", "")
    assert "".join(_layer_sequence(model)) == expected
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 14 and all(d.p == 0.05 for d in dropouts)
    # Nothing stochastic in the deterministic head.
    assert not any(isinstance(m, nn.Dropout) for m in [*model.stn.modules(), *model.first_conv])


def test_paper_forward_shape_batch_of_one():
    model = GaMPEN(PAPER.network, 0.0, 239).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 239, 239))
    assert out.shape == (1, 9) and torch.isfinite(out).all()


def test_quick_preset_shapes_and_widths():
    model = GaMPEN(QUICK.network, 0.01, 239)
    x = torch.randn(3, 1, 239, 239)
    cropped, scale = model.stn(x)
    assert cropped.shape == (3, 1, 64, 64) and scale.shape == (3,)
    assert model.deterministic_head(x).shape == (3, 8, 64, 64)
    assert model(x).shape == (3, 9)
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [
        (64 * 2 * 2, 256),
        (256, 256),
        (256, 9),
    ]


def test_stn_is_identity_at_init():
    cfg = dataclasses.replace(SMALL, stn_output_px=48)
    model = GaMPEN(cfg, 0.0, 48)
    x = torch.randn(4, 1, 48, 48)
    cropped, scale = model.stn(x)
    torch.testing.assert_close(scale, torch.ones(4))
    torch.testing.assert_close(cropped, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("supersample", [1, 4])
def test_stn_matches_affine_grid_sample_and_its_gradient(supersample):
    # A X A^T with tent weights == F.affine_grid + F.grid_sample (bilinear, zeros padding,
    # align_corners=False) + avg_pool2d, in value and in the gradient w.r.t. the zoom s,
    # including zooms beyond the frame (s > 1: zero padding) and the paper's odd sizes.
    import torch.nn.functional as F

    from gampen_ml.model.network import ZoomSTN

    torch.manual_seed(0)
    for image_px, output_px in [(239, 64), (48, 32), (239, 239)]:
        stn = ZoomSTN(1, image_px, output_px, width_multiplier=0.0625, supersample=supersample)
        x = torch.asinh(torch.rand(3, 1, image_px, image_px) * 30)
        s = torch.tensor([1.0, 0.37, 1.25], requires_grad=True)
        stn.scale = lambda _x, s=s: s  # drive the zoom directly
        ours, _ = stn(x)
        zeros = torch.zeros_like(s)
        theta = torch.stack(
            [torch.stack([s, zeros, zeros], 1), torch.stack([zeros, s, zeros], 1)], 1
        )
        side = output_px * supersample
        grid = F.affine_grid(theta, [3, 1, side, side], align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if supersample > 1:
            ref = F.avg_pool2d(ref, supersample)
        # float32 rounding of the sampling positions: ~1e-4 where the image is steep.
        torch.testing.assert_close(ours, ref, atol=3e-4, rtol=1e-4)
        weights = torch.randn_like(ref)
        (g_ours,) = torch.autograd.grad((ours * weights).sum(), s)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), s)
        if output_px == image_px:
            # Same size: at s = 1 every sampling position is an integer, where the output is
            # not differentiable in s and float rounding picks the one-sided slope; only
            # require a non-zero gradient there (the STN must be able to leave the identity).
            assert torch.all(torch.isfinite(g_ours)) and g_ours[0].abs() > 0
            torch.testing.assert_close(g_ours[1], g_ref[1], atol=1e-3, rtol=1e-3)
        else:
            torch.testing.assert_close(g_ours, g_ref, atol=1e-3, rtol=1e-3)


def test_stn_zoom_crops_the_centre():
    model = GaMPEN(dataclasses.replace(SMALL, stn_output_px=48), 0.0, 96)
    lo, hi = SMALL.stn_zoom_range
    with torch.no_grad():  # s = 0.5: keep the central half of each side
        model.stn.regressor[-1].bias.fill_(math.log((0.5 - lo) / (hi - 0.5)))
    x = torch.randn(2, 1, 96, 96)
    cropped, scale = model.stn(x)
    torch.testing.assert_close(scale, torch.full((2,), 0.5))
    # Pixel centres of the 48-px output land exactly on input pixels 24 ... 71.
    torch.testing.assert_close(cropped, x[..., 24:72, 24:72], atol=1e-4, rtol=1e-4)


def test_stn_zoom_is_bounded_and_starts_at_the_identity():
    model = GaMPEN(dataclasses.replace(SMALL, stn_output_px=48), 0.0, 96)
    x = torch.randn(4, 1, 96, 96)
    _, scale = model.stn(x)
    torch.testing.assert_close(scale, torch.ones(4))  # identity at initialisation
    lo, hi = SMALL.stn_zoom_range
    # The step that ruined an unbounded training (regressor output in the hundreds) keeps
    # the grid on the frame, and the crop keeps a gradient to come back with.
    with torch.no_grad():
        model.stn.regressor[-1].bias.fill_(500.0)
    x.requires_grad_(True)
    cropped, scale = model.stn(x)
    assert torch.all(scale <= hi) and torch.all(scale > 1.0)
    assert cropped.abs().sum() > 0
    unbounded = GaMPEN(dataclasses.replace(SMALL, stn_output_px=48, stn_zoom_range=None), 0, 96)
    with torch.no_grad():
        unbounded.stn.regressor[-1].bias.fill_(500.0)
    assert unbounded.stn(x)[0].abs().sum() == 0  # the collapse the bound prevents
    with pytest.raises(ValueError, match="zoom_range"):
        GaMPEN(dataclasses.replace(SMALL, stn_zoom_range=(0.5, 0.9)), 0.0, 96)
    # Another starting zoom (NetworkConfig.stn_zoom_init), inside the range.
    zoomed = GaMPEN(dataclasses.replace(SMALL, stn_output_px=48, stn_zoom_init=0.6), 0.0, 96)
    torch.testing.assert_close(zoomed.stn(x)[1], torch.full((4,), 0.6))
    with pytest.raises(ValueError, match="zoom_init"):
        GaMPEN(dataclasses.replace(SMALL, stn_zoom_init=1.5), 0.0, 96)


def test_forward_equals_tail_of_head():
    model = GaMPEN(SMALL, 0.3, 48)
    x = torch.randn(5, 1, 48, 48)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.stochastic_tail(model.deterministic_head(x)))
    # With dropout active the same random stream gives the same answer too.
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = model.stochastic_tail(model.deterministic_head(x))
        torch.manual_seed(2)
        c = model(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # dropout really acts in train mode


def _blob_batch(n: int, px: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred Gaussian blobs whose amplitude, width and core contrast encode the labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 3, generator=g)
    r2 = (torch.arange(px) - (px - 1) / 2) ** 2
    r2 = r2[:, None] + r2[None, :]
    amplitude = torch.exp(0.5 * y[:, 0])[:, None, None]
    width_px = (px / 8) * torch.exp(0.25 * y[:, 1])[:, None, None]
    core = 1 + 0.3 * y[:, 2, None, None] * (r2 < (px / 4) ** 2)
    x = amplitude * torch.exp(-r2 / (2 * width_px**2)) * core
    return x.unsqueeze(1) + 0.05 * torch.randn(n, 1, px, px, generator=g), y


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = GaMPEN(SMALL, 0.0, 48)
    x, y = _blob_batch(32, 48, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = gaussian_nll(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Start ~ 0.5 * E|y|^2 = 1.5 (unit variances); fitting the batch lowers it by > 0.75 nat.
    assert losses[0] > 1.3
    # (min over the second half: at this learning rate the tiny net's loss spikes now and then,
    # and where a spike falls shifts with float rounding.)
    assert min(losses[75:]) < losses[0] - 0.75, losses[::10]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="stn_output_px"):
        GaMPEN(dataclasses.replace(SMALL, stn_output_px=16), 0.0, 48)
    with pytest.raises(ValueError, match="dropout_rate"):
        GaMPEN(SMALL, 1.0, 48)
    with pytest.raises(ValueError, match="localization_pool"):
        GaMPEN(dataclasses.replace(SMALL, stn_localization_pool=4), 0.0, 48)


def test_supersampled_stn_conserves_flux_of_unresolved_sources():
    """Area resampling (supersample 4) keeps a point source's flux wherever it falls; plain
    bilinear sampling of a 239 -> 64 px zoom misses or over-weights it (aliasing)."""
    from gampen_ml.model.network import ZoomSTN

    def total(stn, row, col):
        x = torch.zeros(1, 1, 239, 239)
        x[0, 0, row, col] = 1.0
        with torch.no_grad():
            cropped, _ = stn(x)
        return float(cropped.sum()) * (239 / 64) ** 2

    area = ZoomSTN(1, 239, 64, width_multiplier=0.125, localization_pool=4, supersample=4)
    plain = ZoomSTN(1, 239, 64, width_multiplier=0.125, localization_pool=4, supersample=1)
    positions = [(119, 119), (119, 120), (120, 121), (100, 131), (140, 97)]
    area_totals = np.array([total(area, r, c) for r, c in positions])
    plain_totals = np.array([total(plain, r, c) for r, c in positions])
    np.testing.assert_allclose(area_totals, 1.0, rtol=0.08)
    assert plain_totals.max() - plain_totals.min() > 0.5
