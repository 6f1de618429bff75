"""Catalog exports: column metadata, FITS / VOTable / ECSV round trips, provenance."""

from __future__ import annotations

import fnmatch
import io
import re
from pathlib import Path

import astropy.units as u
import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from astropy.io.votable import parse, validate
from astropy.io.votable.ucd import check_ucd
from astropy.table import Table

from gampen_ml.catalog import CATALOG_COLUMN_INFO, CATALOG_SCHEMA, build_catalog, write_catalog
from gampen_ml.cli import EXPORT_FORMATS
from gampen_ml.config import FlagConfig
from gampen_ml.database import LineageRow, record_lineage
from gampen_ml.export import (
    EXPORT_FILES,
    ExportError,
    ExportFormat,
    catalog_data_version,
    export_partition,
    write_exports,
)
from gampen_ml.flags import (
    FLAGS_COLUMN_INFO,
    FLAGS_FILE,
    FLAGS_SCHEMA,
    OPTIONAL_FLAG_COLUMNS,
    compute_flags,
)
from gampen_ml.io import folder_sha256, partition_dir
from gampen_ml.posterior import summarize
from tests.catalog_helpers import posterior_draws, provenance

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalog.md"
READ_FORMAT = {"fits": "fits", "votable": "votable", "ecsv": "ascii.ecsv"}


def small_catalog(n: int = 5, dataset: str = "batch-7") -> pl.DataFrame:
    """Real-cutout-like rows with nulls in every nullable kind (str, int32, float)."""
    rng = np.random.default_rng(3)
    samples = posterior_draws(rng, n, 40)
    meta = pl.DataFrame(
        {
            "galaxy_id": np.arange(n, dtype=np.int64) + 100,
            "source_file": [f"tile_{i}/cutout.fits" if i != 2 else None for i in range(n)],
            "hdu": pl.Series([i if i != 2 else None for i in range(n)], dtype=pl.Int32),
            "ra_deg": [150.0 + 0.01 * i if i % 2 == 0 else None for i in range(n)],
            "dec_deg": [2.2 + 0.01 * i if i % 2 == 0 else None for i in range(n)],
            "psf_fwhm_arcsec": [0.6 + 0.05 * i if i != 1 else None for i in range(n)],
        }
    )
    truths = pl.DataFrame(
        {
            "bt": rng.uniform(0, 1, n),
            "re_arcsec": rng.uniform(0.3, 3, n),
            "flux_nJy": rng.uniform(1e4, 1e5, n),
            "component": ["bulge+disk", "disk", "bulge", "disk", "bulge+disk"][:n],
        }
    )
    return build_catalog(
        summarize(samples),
        meta,
        truths,
        **provenance(model_version="7", n_passes=40, recalibrated=True, dataset=dataset),
    )


def read_back(path: Path, fmt: str) -> tuple[Table, dict[str, str], dict[str, str | None]]:
    """The table, its provenance (as strings) and its UCDs, as a reader of ``fmt`` sees them."""
    table = Table.read(path, format=READ_FORMAT[fmt])
    if fmt == "votable":
        votable = parse(path, verify="exception")
        provenance = {info.name: info.value for info in votable.resources[0].infos}
        ucds = {f.name: f.ucd for f in votable.get_first_table().fields}
    else:
        provenance = {k: str(v) for k, v in table.meta.items()}
        ucds = {name: table[name].meta.get("ucd") for name in table.colnames}
    return table, provenance, ucds


def test_column_info_covers_schema_with_valid_units_and_ucds():
    assert list(CATALOG_COLUMN_INFO) == list(CATALOG_SCHEMA)
    assert set(FLAGS_COLUMN_INFO) == set(FLAGS_SCHEMA) | set(OPTIONAL_FLAG_COLUMNS)
    assert check_ucd("stat.min;phot.flux", check_controlled_vocabulary=True) is False
    for name, info in {**CATALOG_COLUMN_INFO, **FLAGS_COLUMN_INFO}.items():
        assert info.description and info.description.isascii(), name
        assert check_ucd(info.ucd, check_controlled_vocabulary=True), (name, info.ucd)
        if info.unit is not None:
            u.Unit(info.unit, format="vounit")  # raises on anything VOTable cannot carry
            u.Unit(info.unit, format="fits")
    assert CATALOG_COLUMN_INFO["flux_nJy_hpd95_lo"].unit == "nJy"
    assert CATALOG_COLUMN_INFO["re_arcsec_mode"].ucd == "phys.angSize;src;meta.main"
    assert "95.45 %" in CATALOG_COLUMN_INFO["bt_hpd95_hi"].description
    assert sorted(EXPORT_FORMATS) == sorted(f.value for f in ExportFormat)


def test_docs_units_table_matches_the_schema():
    """docs/catalog.md's export units table lists exactly the columns with each unit."""
    section = DOC.read_text().split("| unit | columns |")[1].split("\n\n")[0]
    patterns: dict[str | None, list[str]] = {}
    for line in section.splitlines()[2:]:
        unit_cell, columns_cell = line.split("|")[1:3]
        unit = re.findall(r"`([^`]+)`", unit_cell)
        patterns[unit[0] if unit else None] = re.findall(r"`([^`]+)`", columns_cell)
    for name, info in CATALOG_COLUMN_INFO.items():
        listed = [
            unit for unit, pats in patterns.items() if any(fnmatch.fnmatch(name, p) for p in pats)
        ]
        assert listed == ([info.unit] if info.unit else []), (name, info.unit, listed)
    assert set(patterns) - {None} == {i.unit for i in CATALOG_COLUMN_INFO.values()} - {None}


@pytest.mark.parametrize("fmt", [f.value for f in ExportFormat])
def test_round_trip_keeps_values_units_ucds_and_provenance(tmp_path, fmt):
    catalog = small_catalog()
    (path,) = write_exports(
        catalog, tmp_path, [fmt], data_version="0123456789abcdef", run_id="run-42"
    ).values()
    assert path == tmp_path / EXPORT_FILES[ExportFormat(fmt)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    table, provenance, ucds = read_back(path, fmt)

    assert table.colnames == list(CATALOG_SCHEMA)
    assert table["re_arcsec_hpd68_lo"].unit == u.arcsec
    assert table["flux_nJy_mean"].unit == u.nJy
    assert table["magnitude_mode"].unit == u.mag
    assert table["ra_deg"].unit == u.deg
    assert table["bt_mode"].unit is None
    for name, info in CATALOG_COLUMN_INFO.items():
        assert ucds[name] == info.ucd, name
        # VOTable writers wrap long DESCRIPTION text; XML readers collapse the whitespace.
        assert " ".join(table[name].description.split()) == info.description, name

    for name, dtype in CATALOG_SCHEMA.items():
        column, series = table[name], catalog[name]
        mask = np.asarray(np.ma.getmaskarray(column))
        if dtype.is_float():
            got = np.ma.filled(column.astype(np.float64), np.nan)
            np.testing.assert_array_equal(got, series.to_numpy(), err_msg=name)
        elif dtype == pl.String:
            got = [None if m else str(v) for v, m in zip(column, mask, strict=True)]
            want = series.to_list()
            if fmt == "votable":  # VOTable has no null string: it reads back empty
                want = [v or "" for v in want]
                got = [v or "" for v in got]
            assert got == want, name
        else:
            got = [None if m else v.item() for v, m in zip(column, mask, strict=True)]
            assert got == series.to_list(), name

    assert provenance["DATASET"] == "batch-7"
    assert provenance["MODEL"] == "gampen-tiny" and provenance["MODELVER"] == "7"
    assert float(provenance["DROPOUT"]) == 0.05 and int(provenance["NPASSES"]) == 40
    assert provenance["RECALIB"].lower() == "true"
    assert provenance["DATAVER"] == "0123456789abcdef" and provenance["RUNID"] == "run-42"
    assert provenance["CODEVER"] == catalog["code_version"][0]
    assert provenance["MAGSYS"] == "AB"
    if fmt == "votable":
        report = io.StringIO()
        assert validate(str(path), output=report), report.getvalue()


def test_fits_header_speaks_to_plain_fits_readers(tmp_path):
    (path,) = write_exports(small_catalog(), tmp_path, ["fits"], data_version="ab" * 8).values()
    with fits.open(path, checksum=True) as hdul:
        header = hdul["CATALOG"].header
        assert hdul["CATALOG"].verify_checksum() == 1
    columns = {header[f"TTYPE{i}"]: i for i in range(1, header["TFIELDS"] + 1)}
    assert header[f"TUNIT{columns['flux_nJy_mode']}"] == "nJy"
    assert header[f"TUNIT{columns['magnitude_mode']}"] == "mag"
    assert header.comments[f"TTYPE{columns['dataset']}"].startswith("partition key")
    assert header.comments[f"TTYPE{columns['re_arcsec_hpd99_hi']}"].startswith("upper bound")
    assert header["MAGSYS"] == "AB" and header.comments["DATAVER"].startswith("data version")
    assert header["RECALIB"] is True and header["DROPOUT"] == 0.05
    assert all(len(card.image) == 80 for card in header.cards)


def test_exports_leave_the_data_version_alone(tmp_path):
    folder = tmp_path / "posterior_catalog" / "sim-test"
    write_catalog(folder, small_catalog(dataset="sim-test"))
    np.save(folder / "samples.npy", np.zeros((5, 4, 3), np.float16))
    before = catalog_data_version(folder)
    assert before == folder_sha256(folder)[:16]  # what the asset records (folder_version)
    write_exports(small_catalog(dataset="sim-test"), folder, ["fits", "votable", "ecsv"])
    assert folder_sha256(folder)[:16] != before
    assert catalog_data_version(folder) == before


def test_export_partition_from_storage(tmp_path):
    root = tmp_path / "storage"
    catalog = small_catalog(dataset="batch-7")
    folder = partition_dir(root, "posterior_catalog", "batch-7")
    write_catalog(folder, catalog)
    flags = compute_flags(catalog, FlagConfig())
    flags_folder = partition_dir(root, "qualitative_flags", "batch-7")
    flags_folder.mkdir(parents=True)
    flags.write_parquet(flags_folder / FLAGS_FILE)
    version = catalog_data_version(folder)
    db = tmp_path / "gampen.duckdb"
    record_lineage(
        db,
        LineageRow(
            asset="posterior_catalog", partition="batch-7", data_version=version, run_id="r-1"
        ),
    )

    # Default: the partition's own export file, with the run that wrote this data version.
    result = export_partition(root, "batch-7", "ecsv", database=db)
    assert result.path == folder / "catalog.ecsv" and result.n_rows == 5
    assert result.provenance["DATAVER"] == version and result.provenance["RUNID"] == "r-1"

    out = tmp_path / "joined.fits"
    result = export_partition(root, "batch-7", "fits", out, with_flags=True, database=db)
    table = Table.read(out)
    assert table.colnames[: len(CATALOG_SCHEMA)] == list(CATALOG_SCHEMA)
    assert table["bulge_dominated"].tolist() == flags["bulge_dominated"].to_list()
    assert table["asymmetric"].description == FLAGS_COLUMN_INFO["asymmetric"].description
    assert table.meta["FLAGSVER"] == folder_sha256(flags_folder)[:16]

    with pytest.raises(FileNotFoundError, match=r"posterior_catalog/nope/catalog.parquet.*batch-7"):
        export_partition(root, "nope", "fits")
    with pytest.raises(ExportError, match="needs an output path"):
        export_partition(root, "batch-7", "votable", with_flags=True)
    with pytest.raises(ExportError, match="unknown export format 'csv'"):
        export_partition(root, "batch-7", "csv")
    flags.head(3).write_parquet(flags_folder / FLAGS_FILE)
    with pytest.raises(ExportError, match="re-materialize qualitative_flags"):
        export_partition(root, "batch-7", "ecsv", out, with_flags=True)


def test_export_refuses_what_a_format_cannot_hold(tmp_path):
    catalog = small_catalog()
    accented = catalog.with_columns(pl.lit("galaxie_é.fits").alias("source_file"))
    with pytest.raises(ExportError, match="source_file.*non-ASCII.*votable or ecsv"):
        write_exports(accented, tmp_path, ["fits"])
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    (path,) = write_exports(accented, tmp_path, ["votable"]).values()
    assert Table.read(path)["source_file"][0] == "galaxie_é.fits"
    mixed = pl.concat([catalog, catalog.with_columns(pl.lit("8").alias("model_version"))])
    with pytest.raises(ExportError, match="model_version.*several values"):
        write_exports(mixed, tmp_path, ["ecsv"])
