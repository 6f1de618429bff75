"""The whole tiny pipeline through Dagster: models, calibration, catalog, flags and plots.

One module-scoped run (about a minute on 2 cores) that the tests below inspect.
"""

from __future__ import annotations

import json

import astropy.units as u
import numpy as np
import polars as pl
import pytest
from astropy.io.votable import parse
from astropy.table import Table
from dagster import DagsterInstance, materialize

from gampen_assets.assets import ALL_ASSETS
from gampen_assets.checks import ALL_CHECKS
from gampen_assets.partitions import SIM_TEST, datasets
from gampen_assets.resources import GampenSettings
from gampen_ml.catalog import CATALOG_SCHEMA
from gampen_ml.config import PARAMETERS, dropout_key, get_profile, shard_keys
from gampen_ml.database import query
from gampen_ml.export import catalog_data_version

pytestmark = pytest.mark.slow
TINY = get_profile("tiny")


def _run(selection, resources, instance, partition=None, run_config=None):
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )
    assert result.success, [
        e.event_specific_data.error.message for e in result.all_events if e.is_step_failure
    ]
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("GAMPEN_STORAGE", str(tmp / "storage"))
    mp.setenv("GAMPEN_DUCKDB", str(tmp / "gampen.duckdb"))
    mp.setenv("DAGSTER_HOME", str(tmp))
    resources = {
        "settings": GampenSettings(
            profile_name="tiny",
            storage_root=str(tmp / "storage"),
            dagster_home=str(tmp),
            device="cpu",
        )
    }
    instance = DagsterInstance.ephemeral()
    results = {"inputs": _run(["psf_library", "noise_pool"], resources, instance)}
    for key in shard_keys(TINY):
        results[key] = _run(["simulated_galaxies"], resources, instance, key)
    for rate in TINY.calibration.dropout_rates:
        results[dropout_key(rate)] = _run(["trained_model"], resources, instance, dropout_key(rate))
    results["calibration"] = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=["calibrated_dropout_rate"],
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    instance.add_dynamic_partitions(datasets.name, [SIM_TEST])
    results["catalog"] = _run(
        ["posterior_catalog", "qualitative_flags", "diagnostic_plots"],
        resources,
        instance,
        SIM_TEST,
        # The exports the catalog asset writes on request (default: none, see the inbox test).
        {"ops": {"posterior_catalog": {"config": {"formats": ["fits", "votable"]}}}},
    )
    yield tmp, results, resources, instance
    mp.undo()


def _meta(result, node):
    return result.asset_materializations_for_node(node)[0].metadata


def test_trained_models(pipeline):
    tmp, results, _, _ = pipeline
    for rate in TINY.calibration.dropout_rates:
        key = dropout_key(rate)
        meta = _meta(results[key], "trained_model")
        assert meta["dropout_rate"].value == rate
        assert np.isfinite(meta["final_val_loss"].value)
        assert meta["model_version"].value  # registered in the tmp MLflow store
        assert meta["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
        folder = tmp / "storage" / "trained_model" / key
        assert {"state_dict.pt", "model.json", "label_scaler.json", "history.json"} <= {
            p.name for p in folder.iterdir()
        }
        assert not (folder.parent / f".work-{key}").exists()
        (check,) = results[key].get_asset_check_evaluations()
        assert check.passed


def test_calibration_sets_champion(pipeline):
    tmp, results, resources, _ = pipeline
    result = results["calibration"]
    meta = _meta(result, "calibrated_dropout_rate")
    chosen = meta["chosen_dropout_rate"].value
    assert chosen in TINY.calibration.dropout_rates
    folder = tmp / "storage" / "calibrated_dropout_rate" / "all"
    table = pl.read_parquet(folder / "coverage.parquet")
    # 3 parameters x 3 levels per rate, raw and recalibrated (every rate is recalibrated
    # before the sharpest calibrated one is chosen).
    assert table.height == 9 * 2 * len(TINY.calibration.dropout_rates)
    assert set(table["recalibrated"]) == {False, True}
    assert "| dropout_rate | split |" in meta["coverage_table"].value
    calibration = json.loads((folder / "calibration.json").read_text())
    from gampen_ml.registry import model_version_info

    info = model_version_info(
        resources["settings"].tracking_uri(), calibration["model_name"], "champion"
    )
    assert info["version"] == calibration["model_version"] == meta["model_version"].value
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["calibration_valid"].passed
    check = checks["champion_coverage_within_tolerance"]
    assert check.metadata["n_val_galaxies"].value == meta["n_val_galaxies"].value


def test_catalog_flags_plots(pipeline):
    tmp, results, _, _ = pipeline
    result = results["catalog"]
    n_test = sum(
        int(
            (
                pl.read_parquet(tmp / "storage" / "simulated_galaxies" / k / "labels.parquet")[
                    "split"
                ]
                == "test"
            ).sum()
        )
        for k in shard_keys(TINY)
    )
    catalog = pl.read_parquet(tmp / "storage" / "posterior_catalog" / SIM_TEST / "catalog.parquet")
    assert catalog.height == n_test
    meta = _meta(result, "posterior_catalog")
    assert meta["n_galaxies"].value == n_test
    for p in PARAMETERS:
        assert f"test_coverage_{p}_68" in meta
    # Column schema from the one schema; configured exports in the partition, linked, and
    # naming the data version Dagster recorded (which the exports do not change).
    schema = {c.name: c for c in meta["dagster/column_schema"].value.columns}
    assert list(schema) == list(CATALOG_SCHEMA)
    assert schema["re_arcsec_mode"].type == "Float64"
    assert schema["re_arcsec_mode"].description.endswith("[arcsec]")
    assert not schema["bt_mode"].constraints.nullable and schema["bt_true"].constraints.nullable
    folder = tmp / "storage" / "posterior_catalog" / SIM_TEST
    (materialization,) = result.asset_materializations_for_node("posterior_catalog")
    data_version = materialization.tags["dagster/data_version"]
    assert catalog_data_version(folder) == data_version
    assert meta["export_fits"].value == str(folder / "catalog.fits")
    assert meta["export_votable"].value == str(folder / "catalog.vot")
    assert "export_ecsv" not in meta and not (folder / "catalog.ecsv").exists()
    exported = Table.read(folder / "catalog.fits")
    assert exported.meta["DATAVER"] == data_version and exported.meta["RUNID"] == result.run_id
    assert exported["flux_nJy_mode"].unit == u.nJy and len(exported) == n_test
    np.testing.assert_array_equal(exported["bt_mode"], catalog["bt_mode"].to_numpy())
    parse(folder / "catalog.vot", verify="exception")
    flags = pl.read_parquet(tmp / "storage" / "qualitative_flags" / SIM_TEST / "flags.parquet")
    assert flags["galaxy_id"].to_list() == catalog["galaxy_id"].to_list()
    flag_meta = _meta(result, "qualitative_flags")
    assert flag_meta["n_bulge_dominated"].value == float(flags["bulge_dominated"].sum())
    assert flag_meta["dagster/row_count"].value == flags.height
    flag_schema = {c.name: c for c in flag_meta["dagster/column_schema"].value.columns}
    assert list(flag_schema) == flags.columns and flag_schema["small"].type == "Boolean"
    assert flag_schema["ood_reason"].constraints.nullable
    plots_dir = tmp / "storage" / "diagnostic_plots" / SIM_TEST
    pngs = {p.stem for p in plots_dir.glob("*.png")}
    assert {"coverage_vs_dropout", "predicted_vs_true", "loss_curve_dropout-0"} <= pngs
    plot_meta = _meta(result, "diagnostic_plots")
    assert plot_meta["predicted_vs_true"].value.startswith("![predicted_vs_true](data:image/png")
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["posterior_catalog_valid"].passed
    assert evaluations["flags_consistent_with_catalog"].passed
    assert evaluations["plots_written"].passed
    lineage = query(
        tmp / "gampen.duckdb",
        "SELECT asset, model_version, code_version FROM lineage "
        "WHERE asset IN ('posterior_catalog', 'calibrated_dropout_rate')",
    )
    versions = {r["asset"]: r["model_version"] for r in lineage}
    assert versions["posterior_catalog"] == versions["calibrated_dropout_rate"]
    # One code_version(): the catalog's rows and its lineage row name the same code.
    code = {r["asset"]: r["code_version"] for r in lineage}
    assert catalog["code_version"].unique().to_list() == [code["posterior_catalog"]]


def test_inbox_batch_catalog(pipeline):
    """A batch of real cutouts (FITS) gets a catalog without truths, flags and real-data plots."""
    from astropy.io import fits

    tmp, _, resources, instance = pipeline
    key = "hsc-batch-1"
    batch = tmp / "storage" / "inbox_batches" / key
    batch.mkdir(parents=True)
    images = np.load(tmp / "storage" / "simulated_galaxies" / "shard-000" / "images.npy")[:3]
    for i, image in enumerate(images):
        header = fits.Header({"PIXSCALE": TINY.imaging.pixel_scale_arcsec})
        fits.PrimaryHDU(image, header=header).writeto(batch / f"cutout_{i}.fits")
    (batch / "_manifest.json").write_text(json.dumps({"batch": key, "cutouts": 3}))
    instance.add_dynamic_partitions(datasets.name, [key])
    result = _run(
        ["posterior_catalog", "qualitative_flags", "diagnostic_plots"], resources, instance, key
    )
    catalog = pl.read_parquet(tmp / "storage" / "posterior_catalog" / key / "catalog.parquet")
    assert catalog.height == 3
    assert catalog["source_file"].to_list() == [f"cutout_{i}.fits" for i in range(3)]
    assert catalog["bt_true"].null_count() == 3
    assert set(catalog["dataset"]) == {key}
    meta = _meta(result, "posterior_catalog")
    assert "test_coverage" not in meta
    assert not [k for k in meta if k.startswith("export_")]  # no exports unless configured
    assert not list((tmp / "storage" / "posterior_catalog" / key).glob("catalog.[fve]*"))
    assert "dagster/column_schema" in meta
    pngs = {p.stem for p in (tmp / "storage" / "diagnostic_plots" / key).glob("*.png")}
    assert "parameter_distributions" in pngs and "predicted_vs_true" not in pngs
    assert all(e.passed for e in result.get_asset_check_evaluations())


def test_robustness_report_asset(pipeline):
    tmp, _, resources, instance = pipeline
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=["robustness_report"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"robustness_report": {"config": {"n_per_variation": 3}}}},
        raise_on_error=False,
    )
    assert result.success
    meta = _meta(result, "robustness_report")
    folder = tmp / "storage" / "robustness_report" / "all"
    report = json.loads((folder / "robustness.json").read_text())
    table = pl.DataFrame(report["table"])
    assert table.height == 7 * 3 and set(table["n"]) == {3}
    assert meta["n_targets_missed"].value == len(report["misses"])
    assert meta["coverage_per_variation"].value.startswith("![coverage per variation](data:")
    assert (folder / "robustness_coverage.png").read_bytes()[:4] == b"\x89PNG"
    (check,) = result.get_asset_check_evaluations()
    assert check.passed == (not report["misses"])
    rows = query(
        str(tmp / "gampen.duckdb"), "select asset from lineage where asset = 'robustness_report'"
    )
    assert rows
