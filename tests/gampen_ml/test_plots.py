"""Diagnostic figures on small synthetic catalogs: real rendering, pixel sizes, errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from gampen_ml import plots
from gampen_ml.config import PARAMETERS, get_profile
from gampen_ml.flags import FLAG_COLUMNS
from gampen_ml.metrics import flag_arrays

Z = {"68": 1.0, "95": 2.0, "99": 3.0}


def synthetic_catalog(n: int = 400, seed: int = 0, *, truths: bool = True) -> pl.DataFrame:
    """Truths from the Table-1 priors, modes = truth + Gaussian noise, HPD = mode +- z sigma."""
    rng = np.random.default_rng(seed)
    priors = get_profile("tiny").simulation.priors
    single = rng.random(n) < 1 - priors.bulge_disk_fraction
    bt = np.where(single, rng.integers(0, 2, n).astype(float), rng.uniform(*priors.bt, n))
    true = {
        "bt": bt,
        "re_arcsec": rng.uniform(*priors.re_arcsec, n),
        "flux_nJy": rng.uniform(*priors.flux_nJy, n),
    }
    sigma = {
        "bt": np.full(n, 0.05),
        "re_arcsec": 0.05 * true["re_arcsec"],
        "flux_nJy": 0.02 * true["flux_nJy"],
    }
    cols: dict[str, object] = {
        "galaxy_id": np.arange(n, dtype=np.int64),
        "dataset": ["sim-test"] * n,
    }
    for p in PARAMETERS:
        mode = true[p] + sigma[p] * rng.standard_normal(n)
        if p == "bt":
            mode = np.clip(mode, 0.0, 1.0)
        cols |= {f"{p}_mode": mode, f"{p}_mean": mode, f"{p}_median": mode, f"{p}_std": sigma[p]}
        for tag, z in Z.items():
            cols[f"{p}_hpd{tag}_lo"] = mode - z * sigma[p]
            cols[f"{p}_hpd{tag}_hi"] = mode + z * sigma[p]
        cols[f"{p}_true"] = true[p] if truths else [None] * n
    comp = np.where(single, np.where(bt == 1.0, "bulge", "disk"), "bulge+disk")
    cols["component_true"] = comp.tolist() if truths else [None] * n
    cols["magnitude_mode"] = 31.4 - 2.5 * np.log10(np.abs(cols["flux_nJy_mode"]))
    schema = {f"{p}_true": pl.Float64 for p in PARAMETERS} | {"component_true": pl.String}
    return pl.DataFrame(cols, schema_overrides=schema)


def coverage_table() -> pl.DataFrame:
    rows = []
    for rate in (0.0, 0.01, 0.05):
        for p in PARAMETERS:
            for level in (0.6827, 0.9545, 0.9973):
                for recal in (False, True):
                    cov = min(1.0, level * (0.8 + 4 * rate)) if not recal else level
                    rows.append((rate, "val", p, level, cov, recal))
    return pl.DataFrame(
        rows,
        schema=["dropout_rate", "split", "parameter", "level", "coverage", "recalibrated"],
        orient="row",
    )


def flags_table(cat: pl.DataFrame) -> pl.DataFrame:
    f = flag_arrays(cat)
    return pl.DataFrame({"galaxy_id": cat["galaxy_id"], "dataset": cat["dataset"], **f})


def assert_png(path, fig_size_in, dpi=plots.DPI):
    assert path.stat().st_size > 1000
    img = imread(path)
    w, h = fig_size_in
    assert img.shape[:2] == (round(h * dpi), round(w * dpi))
    # Not a blank canvas: there is ink in the figure.
    assert img[..., :3].std() > 0.05


@pytest.fixture(scope="module")
def sim_catalog():
    return synthetic_catalog()


CATALOG_FIGURES = [
    plots.predicted_vs_true,
    plots.residual_histograms,
    plots.residuals_vs_true,
    plots.residuals_vs_predicted,
    plots.bt_residuals_by_type,
    plots.fractional_residuals,
    plots.uncertainty_vs_parameters,
    plots.uncertainty_vs_residuals,
    plots.flag_regions,
    plots.confusion_matrix,
    plots.posterior_width_distributions,
    plots.parameter_distributions,
]


@pytest.mark.parametrize("func", CATALOG_FIGURES, ids=lambda f: f.__name__)
def test_catalog_figure_writes_png_of_figure_size(func, sim_catalog, tmp_path):
    fig = func(sim_catalog)
    size = tuple(fig.get_size_inches())
    path = plots.save_figure(fig, tmp_path / f"{func.__name__}.png")
    assert_png(path, size)


@pytest.mark.parametrize(
    ("func", "column"),
    [
        (plots.predicted_vs_true, "re_arcsec_true"),
        (plots.residuals_vs_true, "flux_nJy_mode"),
        (plots.uncertainty_vs_residuals, "bt_hpd68_hi"),
        (plots.flag_regions, "re_arcsec_mode"),
        (plots.posterior_width_distributions, "flux_nJy_hpd68_lo"),
    ],
)
def test_missing_column_raises_naming_it(func, column, sim_catalog):
    with pytest.raises(ValueError, match=column):
        func(sim_catalog.drop(column))


def test_truth_figures_refuse_real_catalog():
    real = synthetic_catalog(50, truths=False)
    with pytest.raises(ValueError, match="bt_true.*all null"):
        plots.predicted_vs_true(real)


def test_binned_percentiles_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, 5000)
    y = x + rng.standard_normal(5000)
    edges = np.linspace(0, 10, 6)
    centres, q, n = plots.binned_percentiles(x, y, edges)
    np.testing.assert_allclose(centres, [1, 3, 5, 7, 9])
    in_bin = (x >= 2) & (x < 4)
    assert n[1] == in_bin.sum()
    np.testing.assert_allclose(q[1], np.percentile(y[in_bin], [16, 50, 84]), rtol=1e-12)
    # Log-spaced edges give geometric centres.
    centres, _, _ = plots.binned_percentiles(x + 1, y, np.geomspace(1, 11, 4))
    np.testing.assert_allclose(centres[0], np.sqrt(1 * 11 ** (1 / 3)))


def test_confusion_counts_and_flag_arrays(sim_catalog):
    counts = plots.bt_confusion_counts(sim_catalog)
    assert counts.sum() == sim_catalog.height
    bt_t, bt_m = sim_catalog["bt_true"].to_numpy(), sim_catalog["bt_mode"].to_numpy()
    # True disk-dominated galaxies labelled disk-dominated, computed directly.
    assert counts[0, 0] == np.sum((bt_t <= 0.1) & (bt_m <= 0.1))
    assert counts[2, 2] == np.sum((bt_t >= 0.85) & (bt_m >= 0.85))
    # A flags table overrides the modes: flag nobody and the label columns empty.
    none = flags_table(sim_catalog).with_columns(pl.lit(False).alias(c) for c in FLAG_COLUMNS)
    counts = plots.bt_confusion_counts(sim_catalog, none)
    assert counts[:, [0, 2]].sum() == 0 and counts[:, 1].sum() == sim_catalog.height


def test_coverage_vs_dropout_png_and_missing_column(tmp_path):
    table = coverage_table()
    fig = plots.coverage_vs_dropout(table, chosen_dropout=0.01)
    size = tuple(fig.get_size_inches())
    assert size == (6.5, 1.9 * 4)  # three parameters + the mean row
    assert_png(plots.save_figure(fig, tmp_path / "cov.png"), size)
    with pytest.raises(ValueError, match="recalibrated"):
        plots.coverage_vs_dropout(table.drop("recalibrated"))
    with pytest.raises(ValueError, match="split 'test'"):
        plots.coverage_vs_dropout(table, split="test")


def test_stn_corner_examples_thumbnails_loss(tmp_path, sim_catalog):
    rng = np.random.default_rng(2)
    images = rng.standard_normal((7, 24, 24)).astype(np.float32)
    outs = rng.standard_normal((7, 12, 12)).astype(np.float32)
    scales = rng.uniform(0.2, 1.0, 7)
    fig = plots.stn_examples(images, outs, scales, n_show=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == [f"s = {s:.3f}" for s in np.sort(scales)[:3]]
    assert titles[3:] == [f"s = {s:.3f}" for s in np.sort(scales)[::-1][:3]]
    assert_png(plots.save_figure(fig, tmp_path / "stn.png"), (4.5, 6.4))
    with pytest.raises(ValueError, match="same non-zero length"):
        plots.stn_examples(images, outs[:3], scales)

    samples = np.stack(
        [rng.normal(0.4, 0.05, 500), rng.normal(2.0, 0.1, 500), rng.normal(1e5, 2e3, 500)], axis=-1
    )
    fig = plots.posterior_corner(samples, truth=(0.42, 2.05, 1.01e5))
    assert len(fig.axes) == 9
    assert_png(plots.save_figure(fig, tmp_path / "corner.png"), (6.0, 6.0))

    rows = sim_catalog[:2]
    k_samples = np.stack([samples, samples])
    fig = plots.example_posteriors(k_samples, rows, images=images[:2])
    size = tuple(fig.get_size_inches())
    assert_png(plots.save_figure(fig, tmp_path / "ex.png"), size)
    with pytest.raises(ValueError, match="bt_hpd95_lo"):
        plots.example_posteriors(k_samples, rows.drop("bt_hpd95_lo"))

    fig = plots.thumbnail_grid(images[:5], [f"g{i}" for i in range(5)])
    assert_png(plots.save_figure(fig, tmp_path / "thumbs.png"), (1.6 * 3, 1.7 * 2))

    history = [
        {"epoch": i, "train_loss": 3.0 - i, "val_loss": 3.2 - i, "lr": 1e-3} for i in range(4)
    ]
    fig = plots.loss_curve(history)
    assert [line.get_label() for line in fig.axes[0].lines] == ["train_loss", "val_loss"]
    assert_png(plots.save_figure(fig, tmp_path / "loss.png"), (5.5, 3.5))
    with pytest.raises(ValueError, match="loss"):
        plots.loss_curve([{"epoch": 0, "lr": 1.0}])


def test_png_markdown_data_uri(tmp_path):
    fig = plots.thumbnail_grid(np.random.default_rng(3).random((4, 16, 16)))
    path = plots.save_figure(fig, tmp_path / "t.png")
    for source, max_px in ((path, None), (path, 100), (path.read_bytes(), 64)):
        md = plots.png_markdown(source, max_px=max_px, title="thumbs")
        assert md.startswith("![thumbs](data:image/png;base64,") and md.endswith(")")
        data = base64.b64decode(md[len("![thumbs](data:image/png;base64,") : -1])
        img = imread(io.BytesIO(data))
        if max_px is None:
            assert img.shape[:2] == imread(path).shape[:2]
        else:
            assert max(img.shape[:2]) <= max_px
    md = plots.png_markdown(plots.loss_curve([{"loss": 1.0}, {"loss": 0.5}]), max_px=200)
    img = imread(io.BytesIO(base64.b64decode(md.split(",", 1)[1][:-1])))
    assert max(img.shape[:2]) == 200
    with pytest.raises(ValueError, match="not a PNG"):
        plots.png_markdown(b"GIF89a....")


@pytest.mark.slow
def test_make_catalog_figures_sim_and_real(tmp_path, sim_catalog):
    rng = np.random.default_rng(4)
    n = sim_catalog.height
    samples = np.stack(
        [
            sim_catalog[f"{p}_mode"].to_numpy()[:, None] * (1 + 0.02 * rng.standard_normal((n, 50)))
            for p in PARAMETERS
        ],
        axis=-1,
    ).astype(np.float32)
    samples[::2, :, 0] = 0.0  # single-component posteriors snapped to B/T = 0: no spread
    paths = plots.make_catalog_figures(
        sim_catalog,
        tmp_path / "sim",
        flags=flags_table(sim_catalog),
        coverage_table=coverage_table(),
        samples=samples,
        chosen_dropout=0.01,
    )
    expected_sim = set(plots.CAPTIONS) | {"index"}
    assert set(paths) == expected_sim
    for name, path in paths.items():
        assert path.exists() and path.stat().st_size > 0, name
    index = paths["index"].read_text()
    assert "400 galaxies, simulated" in index
    assert "![confusion_matrix](confusion_matrix.png)" in index

    real = synthetic_catalog(120, truths=False)
    paths = plots.make_catalog_figures(real, tmp_path / "real", flags=flags_table(real))
    assert set(paths) == {
        "uncertainty_vs_parameters",
        "posterior_width_distributions",
        "parameter_distributions",
        "flag_fractions",
        "index",
    }
    assert "real (no truths)" in paths["index"].read_text()


@pytest.mark.slow
def test_aggregate_figures_scale_to_1e5_galaxies(tmp_path):
    import time

    big = synthetic_catalog(100_000, seed=5)
    t0 = time.perf_counter()
    fig = plots.residuals_vs_true(big)
    plots.save_figure(fig, tmp_path / "big.png")
    assert time.perf_counter() - t0 < 20.0
