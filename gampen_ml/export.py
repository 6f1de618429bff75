"""Standard-format exports of a posterior catalog: FITS, VOTable and ECSV, with units.

The catalog (optionally joined with its qualitative flags) becomes an astropy
:class:`~astropy.table.Table` whose columns carry the unit, UCD and description of
:data:`gampen_ml.catalog.CATALOG_COLUMN_INFO` / :data:`gampen_ml.flags.FLAGS_COLUMN_INFO`,
and whose ``meta`` holds the provenance (:data:`PROVENANCE_KEYWORDS`): the model, its
dropout rate, the recalibration, the code and the data version of the partition. Each
format keeps all of it:

* FITS: a binary table HDU ``CATALOG``; units in ``TUNITn``, the description as the
  ``TTYPEn`` comment (shortened to fit the card) and in full, with the UCD, in astropy's
  serialized-column header block; provenance as header keywords with comments.
* VOTable (BINARY2 serialization, which keeps nulls of every type but strings): ``unit``,
  ``ucd`` and ``DESCRIPTION`` on each ``FIELD``; provenance as ``INFO`` elements of the
  ``RESOURCE``. Passes ``astropy.io.votable`` validation. Null strings read back empty.
* ECSV: everything in the YAML header.

Files are written through :func:`gampen_ml.io.atomic_file`, so an export beside a
published catalog never leaves a half-written file. Exports do not count in the catalog's
data version (:func:`catalog_data_version`), so exporting never makes a partition look
changed.
"""

from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from astropy.io import fits
from astropy.io.votable import from_table
from astropy.io.votable.tree import Info
from astropy.table import Table

from gampen_ml.catalog import CATALOG_COLUMN_INFO, validate_catalog
from gampen_ml.flags import FLAGS_COLUMN_INFO
from gampen_ml.io import atomic_file, file_sha256, folder_sha256
from gampen_ml.store import POSTERIOR_CATALOG, Store


class ExportFormat(enum.StrEnum):
    """Export formats (the values are what ``gampen export --format`` and the asset take)."""

    fits = "fits"
    votable = "votable"
    ecsv = "ecsv"


#: File name of each format's export inside a ``posterior_catalog`` partition.
EXPORT_FILES: dict[ExportFormat, str] = {
    ExportFormat.fits: "catalog.fits",
    ExportFormat.votable: "catalog.vot",
    ExportFormat.ecsv: "catalog.ecsv",
}
#: Provenance keys (FITS keywords of at most 8 characters, VOTable ``INFO`` names, ECSV
#: ``meta`` keys) and what each means (FITS keyword comment, ``INFO`` text).
PROVENANCE_KEYWORDS: dict[str, str] = {
    "ASSET": "Dagster asset of the exported table",
    "DATASET": "dataset (partition key)",
    "DATAVER": "data version of the catalog partition",
    "RUNID": "Dagster run of the catalog",
    "FLAGSVER": "data version of the joined qualitative_flags",
    "MODEL": "MLflow registered model",
    "MODELVER": "MLflow model version",
    "DROPOUT": "dropout rate of the model",
    "NPASSES": "Monte-Carlo dropout passes per galaxy",
    "RECALIB": "post-hoc recalibration applied",
    "CODEVER": "gampen_ml version that made the catalog",
    "MAGSYS": "photometric system of the magnitudes",
}
#: Catalog columns that hold one value per catalog, and their provenance keys.
_ROW_PROVENANCE = {
    "dataset": "DATASET",
    "model_name": "MODEL",
    "model_version": "MODELVER",
    "dropout_rate": "DROPOUT",
    "n_passes": "NPASSES",
    "recalibrated": "RECALIB",
    "code_version": "CODEVER",
}
#: Characters in a FITS header card.
_FITS_CARD = 80


class ExportError(ValueError):
    """A catalog cannot be exported as asked; the message names the file, column or value."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_partition` wrote."""

    path: Path
    n_rows: int
    provenance: dict[str, object]


def parse_format(name: str | ExportFormat) -> ExportFormat:
    """The :class:`ExportFormat` called ``name``; :class:`ExportError` lists the known ones."""
    try:
        return ExportFormat(name)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ExportError(f"unknown export format {name!r} (known: {known})") from None


def is_export_file(name: str) -> bool:
    """Whether a file name in a catalog partition is an export (or its temporary)."""
    names = tuple(EXPORT_FILES.values())
    return name in names or (name.startswith(".tmp-") and name.endswith(names))


def catalog_data_version(folder: Path | str) -> str:
    """Data version of a ``posterior_catalog`` partition folder: 16 hex digits.

    SHA-256 over the names and contents of its files except the exports -- what the
    asset records (``folder_version`` of the folder before it writes exports), so a
    catalog exported from the command line names the same version Dagster shows.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_export_file(path.name):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def catalog_provenance(
    catalog: pl.DataFrame,
    *,
    data_version: str | None = None,
    run_id: str | None = None,
    flags_version: str | None = None,
) -> dict[str, object]:
    """Provenance of one catalog partition, keyed as :data:`PROVENANCE_KEYWORDS`.

    Model name and version, dropout rate, passes, recalibration, code version and dataset
    come from the catalog rows (one value each: a partition is made by one model run);
    the data versions and the run id from the caller (the asset, or
    :func:`export_partition` from the folder and the lineage database). Unknown values
    are left out.

    Raises
    ------
    ExportError
        If a provenance column holds more than one value.
    """
    provenance: dict[str, object] = {"ASSET": POSTERIOR_CATALOG}
    for column, key in _ROW_PROVENANCE.items():
        values = catalog[column].drop_nulls().unique(maintain_order=True).to_list()
        if len(values) > 1:
            raise ExportError(
                f"catalog column {column!r} holds several values {values[:5]}; an export "
                "describes one catalog partition made by one model"
            )
        if values:
            provenance[key] = values[0]
    for key, value in (("DATAVER", data_version), ("RUNID", run_id), ("FLAGSVER", flags_version)):
        if value:
            provenance[key] = value
    provenance["MAGSYS"] = "AB"
    return {key: provenance[key] for key in PROVENANCE_KEYWORDS if key in provenance}


def catalog_table(
    catalog: pl.DataFrame,
    provenance: Mapping[str, object],
    *,
    flags: pl.DataFrame | None = None,
) -> Table:
    """The catalog as an astropy Table with units, UCDs, descriptions and provenance.

    Parameters
    ----------
    catalog : pl.DataFrame
        A posterior catalog (validated against ``CATALOG_SCHEMA``; columns added since a
        stored catalog was written come out null).
    provenance : mapping
        :func:`catalog_provenance`; becomes ``Table.meta``.
    flags : pl.DataFrame, optional
        The partition's qualitative flags (``flags.parquet``), one row per catalog row in
        the same order; its columns other than ``galaxy_id`` and ``dataset`` are appended.

    Returns
    -------
    astropy.table.Table
        One column per catalog (and flag) column: nulls masked, ``unit``,
        ``description`` and ``meta["ucd"]`` set.

    Raises
    ------
    ExportError
        If the flags are not the catalog's rows, or a column has no description.
    """
    catalog = validate_catalog(catalog, source="export")
    if flags is not None:
        if flags["galaxy_id"].to_list() != catalog["galaxy_id"].to_list():
            raise ExportError(
                f"the flags' galaxy_id ({flags.height} rows) differ from the catalog's "
                f"({catalog.height} rows): re-materialize qualitative_flags for this dataset"
            )
        catalog = catalog.hstack(flags.drop("galaxy_id", "dataset"))
    info = {**FLAGS_COLUMN_INFO, **CATALOG_COLUMN_INFO}
    undescribed = [c for c in catalog.columns if c not in info]
    if undescribed:
        raise ExportError(f"columns without a description in the schema: {undescribed}")
    table = Table.from_df(catalog)
    for name in table.colnames:
        column, meaning = table[name], info[name]
        column.unit = meaning.unit
        column.description = meaning.description
        if meaning.ucd:
            column.meta["ucd"] = meaning.ucd
    table.meta.update(provenance)
    return table


def _require_ascii(table: Table, path: Path) -> None:
    """FITS holds ASCII text only: name the first column and value that is not."""
    for name in table.colnames:
        if table[name].dtype.kind != "U":
            continue
        text = np.asarray(table[name])
        try:
            text.astype("S")  # numpy encodes as ASCII, in C
        except UnicodeEncodeError:
            value = next(v for v in text if not v.isascii())
            raise ExportError(
                f"{path}: column {name!r} holds non-ASCII text {value!r}, which FITS "
                "cannot store; export as votable or ecsv"
            ) from None
    for key, value in table.meta.items():
        if isinstance(value, str) and not value.isascii():
            raise ExportError(f"{path}: provenance {key} = {value!r} is not ASCII text")


def _write_fits(table: Table, path: Path, final: Path) -> None:
    _require_ascii(table, final)
    # Table.write adds astropy's serialized-column block (descriptions, UCDs); the
    # keyword comments and checksums are added to its output.
    buffer = io.BytesIO()
    table.write(buffer, format="fits", name="CATALOG")
    buffer.seek(0)
    with fits.open(buffer) as hdul:
        header = hdul[1].header
        for key in table.meta:
            header.comments[key] = _fitting_comment(header.cards[key], PROVENANCE_KEYWORDS[key])
        for i, name in enumerate(table.colnames, start=1):
            card = header.cards[f"TTYPE{i}"]
            header.comments[card.keyword] = _fitting_comment(card, table[name].description)
        hdul.writeto(path, checksum=True)


def _fitting_comment(card: fits.Card, text: str | None) -> str:
    """``text`` shortened to the room a one-line card leaves after its value and " / "."""
    text = text or ""
    value = str(fits.Card(card.keyword, card.value)).rstrip()
    if len(value) > _FITS_CARD:  # a long string on CONTINUE cards: the comment has a line
        return text
    room = _FITS_CARD - max(len(value), 30) - 3  # values fill at least 30 columns
    return text if len(text) <= room else text[: max(room - 3, 0)] + "..."


def _info_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _write_votable(table: Table, path: Path) -> None:
    votable = from_table(table)
    resource = votable.resources[0]
    for key, value in table.meta.items():
        info = Info(name=key, value=_info_value(value))
        info.content = PROVENANCE_KEYWORDS[key]
        resource.infos.append(info)
    vo_table = resource.tables[0]
    vo_table.name = POSTERIOR_CATALOG
    vo_table.description = (
        f"GaMPEN posterior catalog of dataset {table.meta.get('DATASET', '?')}: B/T, Re "
        "(arcsec) and flux (nJy) per galaxy; magnitudes are AB"
    )
    vo_table.format = "binary2"
    votable.to_xml(str(path))


def write_table(table: Table, path: Path | str, fmt: str | ExportFormat) -> Path:
    """Write ``table`` (from :func:`catalog_table`) to ``path`` atomically; return ``path``."""
    fmt = parse_format(fmt)
    path = Path(path)
    with atomic_file(path) as tmp:
        if fmt is ExportFormat.fits:
            _write_fits(table, tmp, path)
        elif fmt is ExportFormat.votable:
            _write_votable(table, tmp)
        else:
            table.write(tmp, format="ascii.ecsv")
    return path


def write_exports(
    catalog: pl.DataFrame,
    folder: Path | str,
    formats: Iterable[str | ExportFormat],
    *,
    data_version: str | None = None,
    run_id: str | None = None,
) -> dict[ExportFormat, Path]:
    """Write ``<folder>/catalog.<fits|vot|ecsv>`` (:data:`EXPORT_FILES`) for each format.

    What the ``posterior_catalog`` asset calls on its published partition folder with
    its data version and run id.
    """
    formats = list(dict.fromkeys(parse_format(f) for f in formats))
    if not formats:
        return {}
    provenance = catalog_provenance(catalog, data_version=data_version, run_id=run_id)
    table = catalog_table(catalog, provenance)
    return {fmt: write_table(table, Path(folder) / EXPORT_FILES[fmt], fmt) for fmt in formats}


def _lineage_run_id(database: Path | None, dataset: str, data_version: str) -> str | None:
    """Run id of the successful materialization that wrote this data version, if recorded."""
    if database is None or not Path(database).is_file():
        return None
    from gampen_ml.database import query

    rows = query(
        database,
        "SELECT run_id FROM lineage WHERE asset = 'posterior_catalog' AND partition = ? "
        "AND data_version = ? AND status = 'success' ORDER BY finished_at DESC LIMIT 1",
        [dataset, data_version],
    )
    return rows[0]["run_id"] if rows else None


def export_partition(
    root: Path | str,
    dataset: str,
    fmt: str | ExportFormat,
    out: Path | str | None = None,
    *,
    with_flags: bool = False,
    database: Path | str | None = None,
) -> ExportResult:
    """Export ``<root>/posterior_catalog/<dataset>/catalog.parquet`` (``gampen export``).

    Parameters
    ----------
    root : path
        Storage root.
    dataset : str
        Partition key (``sim-test`` or an inbox batch).
    fmt : str or ExportFormat
        ``fits``, ``votable`` or ``ecsv``.
    out : path, optional
        Output file; default the partition's own export file (:data:`EXPORT_FILES`),
        which the next materialization of the partition replaces with the catalog.
    with_flags : bool
        Append the columns of ``<root>/qualitative_flags/<dataset>/flags.parquet``; needs
        ``out`` (the flags partition changes on its own, so the joined table is not
        stored inside the catalog's partition).
    database : path, optional
        Lineage database; when it records the materialization that wrote this data
        version, its run id goes into the provenance.

    Raises
    ------
    FileNotFoundError
        If the catalog (or, with ``with_flags``, the flags) partition does not exist;
        the message names the path and the datasets that do.
    ExportError
        For a bad format, flags that do not match the catalog, or text FITS cannot hold.
    """
    fmt = parse_format(fmt)
    store = Store.of(root)
    folder = store.catalog(dataset)
    catalog_path = store.catalog_file(dataset)
    if not catalog_path.is_file():
        stored = list(store.catalog_files())
        raise FileNotFoundError(
            f"no posterior catalog for dataset {dataset!r}: {catalog_path} does not exist "
            f"(datasets with a catalog: {', '.join(stored) or 'none'})"
        )
    if with_flags and out is None:
        raise ExportError(
            "a catalog joined with its flags needs an output path: it is not stored in the "
            f"posterior_catalog partition {folder}"
        )
    catalog = pl.read_parquet(catalog_path)
    flags = flags_version = None
    if with_flags:
        flags_folder = store.flags(dataset)
        flags_path = store.flags_file(dataset)
        if not flags_path.is_file():
            raise FileNotFoundError(
                f"no flags for dataset {dataset!r}: {flags_path} does not exist "
                "(materialize qualitative_flags first)"
            )
        flags = pl.read_parquet(flags_path)
        flags_version = folder_sha256(flags_folder)[:16]
    data_version = catalog_data_version(folder)
    provenance = catalog_provenance(
        catalog,
        data_version=data_version,
        run_id=_lineage_run_id(Path(database) if database else None, dataset, data_version),
        flags_version=flags_version,
    )
    path = Path(out) if out is not None else folder / EXPORT_FILES[fmt]
    table = catalog_table(catalog, provenance, flags=flags)
    return ExportResult(write_table(table, path, fmt), len(table), provenance)
