"""The survey-scale sky catalog: every posterior-catalog row with a position, as one HATS catalog.

(Over 600 lines: the incremental HATS writer, its manifest and its verifier share one layout.)

``<root>/sky_catalog/all/`` is a HATS collection that LSDB opens, cone-searches and
cross-matches (:func:`open_sky_catalog`)::

    sky_catalog/all/
      collection.properties      primary table and default margin, for lsdb.open_catalog
      galaxies/                  the catalog: dataset/Norder=k/Dir=d/Npix=n.parquet, one file
                                 per HEALPix pixel (≤ SkyLayout.pixel_threshold rows, orders
                                 SkyLayout.lowest_order..highest_order), _metadata,
                                 partition_info.csv
      galaxies_10arcs/           margin cache: for every pixel, the rows of its neighbours
                                 within the margin (HEALPix order 13 cells, ≥ 10″ wide)
      gampen_manifest.json       what is published: per dataset the source file's SHA-256,
                                 rows published and rows left out for want of a position;
                                 per pixel the rows of each dataset

Rows come from ``<root>/posterior_catalog/<dataset>/catalog.parquet`` (schema
``docs/catalog.md``) with ``ra_deg``/``dec_deg`` as the position. Rows without one (all of
``sim-test``; real cutouts whose FITS header has no WCS) cannot be placed on the sky: they are
left out and counted per dataset (``SkyCatalogUpdate.rows_without_position``).

Why this design (hats / hats-import / lsdb 0.11). HATS has no append: a catalog is a set of
immutable Parquet files, one per pixel, plus metadata over all of them, and hats-import
builds a whole catalog from its inputs. What hats-import 0.11 does offer is an *incremental
alignment* (``ImportArguments(existing_pixels=...)``, ``hats.pixel_math.
generate_incremental_alignment``): new rows are partitioned around a given set of pixels,
which are kept as they are. :func:`publish_sky_catalog` builds on it and rewrites only the
pixels a batch touches:

1. Datasets whose ``catalog.parquet`` is new or changed since the manifest (SHA-256) are the
   update; unchanged ones are not read. The *touched* pixels are the current pixels holding
   rows of an updated or removed dataset (the manifest's pixel index) or a new row.
2. hats-import partitions the new rows together with the surviving rows of the touched pixels
   (other datasets), with every untouched pixel as ``existing_pixels``: the touched region is
   re-partitioned under the row threshold (an overfull pixel splits), and nothing outside it
   is read or written. A re-published dataset replaces its rows (no duplicates).
3. The new version is assembled in a temporary sibling folder: untouched pixel files are hard
   links to the current ones (Parquet files are never modified in place), the re-imported
   pixels are new files, and hats writes ``_metadata``, ``partition_info.csv`` and the
   properties over all of them. It replaces the published folder by a rename
   (:func:`gampen_ml.io.atomic_partition_dir`), so readers never see half a catalog.
4. The margin cache (needed by LSDB's cross-match for pairs across a pixel border) is
   recomputed for the pixels whose margin band reaches a touched or new pixel, the rest are
   hard links; it holds, as hats-import's margin pipeline does, every row in the order-13
   HEALPix cells bordering a pixel (positive pixels and the empty "negative tree").

A batch that is one survey tile therefore costs the import of its own rows plus the rows of
the few pixels it shares with earlier tiles, independent of the catalog's size; the metadata
step reads one Parquet footer per file. The alternatives cost more at 10³ batches: a full
hats-import rebuild per batch reads the whole catalog every time (~70 min at 10⁸ rows,
``docs/scaling.md``), and one HATS catalog per batch united by ``lsdb`` would make every
reader open and align 10³ catalogs per query, and leave no single HATS catalog for other
tools. One writer at a time: publishing holds an exclusive
lock on ``sky_catalog/.lock``.

One published version is visible at a time: a lazy LSDB catalog opened before a publish may
find its files gone afterwards (reopen it), as for every partition swapped by
``atomic_partition_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from gampen_ml.catalog import validate_catalog
from gampen_ml.io import file_sha256
from gampen_ml.store import POSTERIOR_CATALOG, SKY_CATALOG, Store

#: Storage-root asset folder of the sky catalog (``<root>/sky_catalog/all``).
SKY_CATALOG_ASSET = SKY_CATALOG
#: Asset whose partitions are published.
SOURCE_ASSET = POSTERIOR_CATALOG
#: Name of the primary HATS table inside the collection.
PRIMARY_NAME = "galaxies"
MANIFEST_FILE = "gampen_manifest.json"
MANIFEST_FORMAT = 1
RA_COLUMN = "ra_deg"
DEC_COLUMN = "dec_deg"
#: HATS spatial index column (HEALPix order 29 nested pixel of each row), added by hats-import.
HEALPIX_COLUMN = "_healpix_29"
HEALPIX_INDEX_ORDER = 29


class SkyCatalogError(ValueError):
    """A catalog row cannot be placed on the sky, or no sky catalog is published; says which."""


@dataclass(frozen=True)
class SkyLayout:
    """HEALPix partitioning of the sky catalog.

    Parameters
    ----------
    pixel_threshold : int
        Most rows per pixel file when a region is (re)partitioned. 100,000 catalog rows are
        ~31 MB of Parquet (306 B/row measured, ``docs/scaling.md``). A new tile re-imports
        the rows of the pixels it shares with earlier tiles, so smaller pixels make a batch
        cheaper: at 10⁶ rows in 1-deg² tiles a batch re-imported 2.2x its own rows at this
        threshold, 3.1x at 500,000.
    lowest_order : int
        Coarsest HEALPix order of a pixel (order 5: 1.8°, 3.4 deg², about one survey tile):
        pixels stay local, so a new tile touches only the few pixels it shares with its
        neighbours instead of one huge pixel holding a sparse region.
    highest_order : int
        Finest HEALPix order of a pixel (order 8: 14′ pixels, 0.05 deg², room for 10⁷
        galaxies per deg² under the threshold); must be below the margin's order (13 for
        10″). hats-import's partitioning loops over every pixel of this order in Python
        (0.8 M at order 8, seconds; 12.6 M at order 10, tens of seconds per import).
    margin_threshold_arcsec : float
        Width of the margin cache; cross-matches up to this radius are exact across pixel
        borders.
    """

    pixel_threshold: int = 100_000
    lowest_order: int = 5
    highest_order: int = 8
    margin_threshold_arcsec: float = 10.0

    @property
    def margin_order(self) -> int:
        """HEALPix order of the margin cells: the finest whose cells are ≥ the threshold."""
        import hats.pixel_math.healpix_shim as hp

        return int(hp.margin2order(margin_thr_arcmin=self.margin_threshold_arcsec / 60.0))

    @property
    def margin_name(self) -> str:
        """Folder of the margin cache, e.g. ``galaxies_10arcs``."""
        return f"{PRIMARY_NAME}_{self.margin_threshold_arcsec:g}arcs"


@dataclass
class SkyCatalogUpdate:
    """What one :func:`publish_sky_catalog` call did.

    ``path`` is the collection folder (``None`` while no row has a position);
    ``version`` a 16-hex content version (SHA-256 of the manifest: the sources' hashes and
    the layout), ``previous_version`` that of the state this call started from (``None``
    when nothing was published); ``orders`` the HEALPix orders of the pixels.
    """

    path: Path | None
    version: str
    total_rows: int
    n_pixels: int
    orders: list[int]
    margin_rows: int
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rows_without_position: dict[str, int] = field(default_factory=dict)
    rows_imported: int = 0
    pixels_rewritten: int = 0
    pixels_linked: int = 0
    margin_pixels_rewritten: int = 0
    previous_version: str | None = None
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        """Whether this call published a new version."""
        return bool(self.added or self.replaced or self.removed)


def sky_catalog_dir(root: Path | str) -> Path:
    """``<root>/sky_catalog/all``: the published HATS collection."""
    return Store.of(root).sky_catalog()


def positioned_rows(catalog: pl.DataFrame, source: str) -> tuple[pl.DataFrame, int]:
    """Split a posterior catalog into the rows with a sky position and the count without.

    A row has a position when ``ra_deg`` and ``dec_deg`` are both finite.

    Returns
    -------
    (pl.DataFrame, int)
        The rows with a position (schema unchanged) and the number of rows without.

    Raises
    ------
    SkyCatalogError
        Naming ``source``, when a declination is outside [-90, 90] degrees.
    """
    has_position = pl.col(RA_COLUMN).is_finite().fill_null(False) & pl.col(
        DEC_COLUMN
    ).is_finite().fill_null(False)
    rows = catalog.filter(has_position)
    bad = rows.filter(pl.col(DEC_COLUMN).abs() > 90.0)
    if bad.height:
        first = bad.row(0, named=True)
        raise SkyCatalogError(
            f"{source}: {bad.height} row(s) have {DEC_COLUMN} outside [-90, 90] degrees "
            f"(galaxy_id {first['galaxy_id']}: {first[DEC_COLUMN]!r})"
        )
    return rows, catalog.height - rows.height


def open_sky_catalog(root: Path | str, **kwargs):
    """Open the published sky catalog with its default margin as a lazy ``lsdb.Catalog``.

    ``kwargs`` go to :func:`lsdb.open_catalog` (``columns=``, ``search_filter=``, ...).
    The same as ``lsdb.open_catalog("<root>/sky_catalog/all")``.

    Raises
    ------
    SkyCatalogError
        When nothing with a sky position has been published under ``root``.
    """
    import lsdb

    path = sky_catalog_dir(root)
    if not (path / "collection.properties").is_file():
        raise SkyCatalogError(
            f"no sky catalog at {path}: publish one (asset sky_catalog) from posterior "
            "catalogs with ra_deg/dec_deg"
        )
    return lsdb.open_catalog(path, **kwargs)


def read_manifest(path: Path | str) -> dict:
    """The manifest of a published collection folder (empty when none is published)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return {"format": MANIFEST_FORMAT, "datasets": {}, "pixel_rows": []}
    manifest = json.loads(file.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise SkyCatalogError(f"{file}: manifest format {manifest.get('format')!r} unknown")
    return manifest


def catalog_sources(root: Path | str) -> dict[str, Path]:
    """Dataset key -> ``catalog.parquet`` of every published posterior-catalog partition."""
    return Store.of(root).catalog_files()


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<folder>/.lock``: one publisher at a time (waits)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_source(path: Path) -> tuple[str, pl.DataFrame]:
    """SHA-256 and validated content of one ``catalog.parquet``, read through one handle.

    Hashing and parsing the same open file keeps the two consistent when the partition is
    swapped by a concurrent writer (the handle keeps the old inode).
    """
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        fh.seek(0)
        df = pl.read_parquet(fh)
    return digest, validate_catalog(df, source=str(path))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same bytes, no copy); copy where links are refused."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _tree_index(tree_pixels: np.ndarray, values: np.ndarray, value_order: int) -> np.ndarray:
    """Index into ``tree_pixels`` ((n, 2) [order, pixel], disjoint) of the pixel holding each value.

    ``values`` are nested HEALPix pixels at ``value_order`` (≥ every tree order), e.g. the
    ``_healpix_29`` column or margin cells; -1 where no tree pixel holds the value.
    """
    values = np.asarray(values, dtype=np.int64)
    if len(tree_pixels) == 0:
        return np.full(len(values), -1, dtype=np.int64)
    orders = tree_pixels[:, 0].astype(np.int64)
    shift = 2 * (value_order - orders)
    starts = tree_pixels[:, 1].astype(np.int64) << shift
    ends = (tree_pixels[:, 1].astype(np.int64) + 1) << shift
    order = np.argsort(starts)
    idx = np.searchsorted(starts[order], values, side="right") - 1
    found = idx >= 0
    idx_sorted = np.where(found, order[np.clip(idx, 0, None)], -1)
    inside = found & (values < ends[np.clip(idx_sorted, 0, None)])
    return np.where(inside, idx_sorted, -1)


def _pixel_file(catalog_dir: Path, order: int, pixel: int) -> Path:
    from hats.io import paths
    from hats.pixel_math import HealpixPixel

    return Path(paths.pixel_catalog_file(catalog_dir, HealpixPixel(order, pixel)).path)


def _import_rows(
    inputs: Sequence[Path],
    staging: Path,
    existing_pixels: Sequence[tuple[int, int]],
    layout: SkyLayout,
    expected_rows: int,
    dask_threads: int,
) -> Path:
    """Partition ``inputs`` (catalog-schema Parquet files) with hats-import; return the catalog.

    The new pixels avoid ``existing_pixels`` (hats-import's incremental alignment). A
    one-worker in-process Dask cluster runs the map/reduce and is closed on return.
    """
    from dask.distributed import Client
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.pipeline import pipeline_with_client

    args = ImportArguments(
        output_path=staging,
        output_artifact_name=PRIMARY_NAME,
        input_file_list=list(inputs),
        file_reader="parquet",
        ra_column=RA_COLUMN,
        dec_column=DEC_COLUMN,
        pixel_threshold=layout.pixel_threshold,
        lowest_healpix_order=layout.lowest_order,
        highest_healpix_order=layout.highest_order,
        existing_pixels=list(existing_pixels) or None,
        expected_total_rows=expected_rows,
        should_write_skymap=False,
        progress_bar=False,
        resume=False,
        tmp_dir=staging / "import-tmp",
        dask_tmp=staging / "dask-tmp",
    )
    with Client(
        n_workers=1,
        threads_per_worker=dask_threads,
        processes=False,
        dashboard_address=None,
        local_directory=str(staging / "dask-tmp"),
    ) as client:
        pipeline_with_client(args, client)
    return staging / PRIMARY_NAME


def _write_catalog_metadata(catalog_dir: Path, pixels: np.ndarray, properties) -> int:
    """``_metadata``/``_common_metadata``, ``partition_info.csv`` and properties; total rows."""
    from hats.catalog import PartitionInfo
    from hats.io import paths
    from hats.io.parquet_metadata import write_parquet_metadata
    from hats.pixel_math import HealpixPixel

    healpix = [HealpixPixel(int(o), int(p)) for o, p in pixels]
    partition_info = PartitionInfo.from_healpix(healpix)
    partition_info.write_to_file(paths.get_partition_info_pointer(catalog_dir))
    if healpix:
        total_rows = int(write_parquet_metadata(catalog_dir))
    else:
        total_rows = 0
    properties.copy_and_update(
        total_rows=total_rows,
        hats_order=int(partition_info.get_highest_order()) if healpix else 0,
        moc_sky_fraction=round(partition_info.calculate_fractional_coverage(), 5)
        if healpix
        else 0.0,
        hats_estsize=None,
    ).to_properties_file(catalog_dir)
    return total_rows


def _write_empty_margin_metadata(margin_dir: Path, schema: pa.Schema) -> None:
    from hats.io import paths

    for pointer in (
        paths.get_common_metadata_pointer(margin_dir),
        paths.get_parquet_metadata_pointer(margin_dir),
    ):
        Path(pointer.path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_metadata(schema, pointer.path)


def _margin_cells(pixels: np.ndarray, margin_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Margin cells of every pixel: (owner index, cell at ``margin_order``), concatenated."""
    from hats.pixel_math import get_margin

    owners, cells = [], []
    for i, (order, pixel) in enumerate(pixels):
        margin = np.asarray(get_margin(int(order), int(pixel), margin_order - int(order)))
        owners.append(np.full(len(margin), i, dtype=np.int64))
        cells.append(margin.astype(np.int64))
    if not cells:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(owners), np.concatenate(cells)


def _negative_tree(pixels: np.ndarray) -> np.ndarray:
    """The empty sky of a pixel tree as the fewest pixels (hats' "negative tree").

    The complement of the tree's MOC, whose cells are exactly
    ``hats.pixel_tree.negative_tree.compute_negative_tree_pixels`` (which JIT-compiles with
    numba on first use, seconds per process).
    """
    from hats.pixel_tree.pixel_tree import PixelTree

    if len(pixels) == 0:
        return np.array([(0, p) for p in range(12)], dtype=np.int64)
    tree = PixelTree.from_healpix([(int(o), int(p)) for o, p in pixels])
    cells = tree.to_moc().complement().serialize(format="json")
    return np.array(
        [(int(depth), int(p)) for depth, ipix in cells.items() for p in ipix], dtype=np.int64
    ).reshape(-1, 2)


def _build_margin(
    catalog_dir: Path,
    margin_dir: Path,
    pixels: np.ndarray,
    changed: Sequence[np.ndarray],
    old_margin_dir: Path | None,
    old_pixels: np.ndarray,
    layout: SkyLayout,
    schema: pa.Schema,
) -> tuple[int, int]:
    """Write the margin cache of the catalog in ``catalog_dir``; reuse unaffected old files.

    The margin file of a pixel P (of the catalog or its negative tree) holds every catalog
    row in the ``margin_order`` cells bordering P (``hats.pixel_math.get_margin``), as
    hats-import's margin pipeline writes it. It is recomputed when P is new or one of its
    cells lies in a ``changed`` pixel (a region whose rows changed); otherwise the old file
    is hard-linked. Returns (margin rows, margin pixels rewritten).
    """
    from hats.io import paths

    order_m = layout.margin_order
    combined = np.concatenate([pixels, _negative_tree(pixels)])
    old_combined = (
        {tuple(p) for p in np.concatenate([old_pixels, _negative_tree(old_pixels)])}
        if old_margin_dir is not None
        else set()
    )
    owners, cells = _margin_cells(combined, order_m)
    in_changed = np.zeros(len(cells), dtype=bool)
    for region in changed:
        in_changed |= _tree_index(region, cells, order_m) >= 0
    affected = np.zeros(len(combined), dtype=bool)
    affected[owners[in_changed]] = True
    for i, p in enumerate(combined):
        if tuple(p) not in old_combined:
            affected[i] = True

    # Reuse unaffected margin files.
    for i in np.flatnonzero(~affected):
        src = _pixel_file(old_margin_dir, *combined[i])
        if src.is_file():
            _link_or_copy(src, _pixel_file(margin_dir, *combined[i]))

    # Recompute the affected ones: group their cells by the catalog pixel holding them.
    keep = affected[owners]
    owners, cells = owners[keep], cells[keep]
    source = _tree_index(pixels, cells, order_m)
    has_source = source >= 0
    owners, cells, source = owners[has_source], cells[has_source], source[has_source]
    pieces: dict[int, list[pa.Table]] = {}
    for s in np.unique(source):
        table = pq.read_table(_pixel_file(catalog_dir, *pixels[s]), schema=schema)
        row_cells = table.column(HEALPIX_COLUMN).to_numpy() >> (2 * (HEALPIX_INDEX_ORDER - order_m))
        sel = source == s
        pairs = pl.DataFrame({"cell": cells[sel], "owner": owners[sel]})
        rows = pl.DataFrame({"cell": row_cells, "row": np.arange(len(row_cells))})
        matched = rows.join(pairs, on="cell")
        for (owner,), group in matched.group_by(["owner"]):
            pieces.setdefault(int(owner), []).append(table.take(group["row"].to_numpy()))
    for owner, tables in pieces.items():
        margin = pa.concat_tables(tables).sort_by(HEALPIX_COLUMN)
        out = _pixel_file(margin_dir, *combined[owner])
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(margin, out)

    margin_pixels = np.array(
        [p for p in combined if _pixel_file(margin_dir, *p).is_file()], dtype=np.int64
    ).reshape(-1, 2)
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io.parquet_metadata import write_parquet_metadata
    from hats.pixel_math import HealpixPixel

    healpix = [HealpixPixel(int(o), int(p)) for o, p in margin_pixels]
    margin_dir.mkdir(parents=True, exist_ok=True)
    if healpix:
        margin_rows = int(write_parquet_metadata(margin_dir))
    else:
        margin_rows = 0
        _write_empty_margin_metadata(margin_dir, schema)
    partition_info = PartitionInfo.from_healpix(healpix)
    partition_info.write_to_file(paths.get_partition_info_pointer(margin_dir))
    TableProperties(
        catalog_name=layout.margin_name,
        catalog_type="margin",
        total_rows=margin_rows,
        ra_column=RA_COLUMN,
        dec_column=DEC_COLUMN,
        primary_catalog=PRIMARY_NAME,
        margin_threshold=layout.margin_threshold_arcsec,
        healpix_column=HEALPIX_COLUMN,
        healpix_order=HEALPIX_INDEX_ORDER,
        hats_order=int(partition_info.get_highest_order()) if healpix else 0,
        moc_sky_fraction=round(partition_info.calculate_fractional_coverage(), 5)
        if healpix
        else 0.0,
    ).to_properties_file(margin_dir)
    return margin_rows, int(affected.sum())


def publish_sky_catalog(
    root: Path | str,
    *,
    layout: SkyLayout | None = None,
    dask_threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> SkyCatalogUpdate:
    """Bring ``<root>/sky_catalog/all`` up to date with the posterior catalogs on disk.

    New and changed ``posterior_catalog/<dataset>/catalog.parquet`` files (by SHA-256) are
    published, datasets whose folder is gone are removed, unchanged ones are left alone;
    only the pixels they touch are rewritten (module docstring). With nothing changed the
    published folder is not touched. Holds ``sky_catalog/.lock`` while it works.

    Parameters
    ----------
    root : path
        Storage root.
    layout : SkyLayout, optional
        Partitioning of regions (re)imported now; pixels already published keep theirs.
    dask_threads : int
        Threads of the in-process Dask worker that runs hats-import.
    log : callable(str), optional
        Progress messages.

    Returns
    -------
    SkyCatalogUpdate
    """
    started = time.perf_counter()
    layout = layout or SkyLayout()
    say = log or (lambda message: None)
    if layout.margin_order <= layout.highest_order:
        raise SkyCatalogError(
            f"SkyLayout.highest_order {layout.highest_order} must be below the margin order "
            f"{layout.margin_order} of {layout.margin_threshold_arcsec} arcsec"
        )
    final = sky_catalog_dir(root)
    with _writer_lock(final.parent):
        manifest = read_manifest(final)
        old_datasets: dict[str, dict] = manifest["datasets"]
        sources = catalog_sources(root)
        update = SkyCatalogUpdate(
            path=None, version="", total_rows=0, n_pixels=0, orders=[], margin_rows=0
        )
        if old_datasets:
            update.previous_version = manifest_version(manifest)
        new_rows: dict[str, pl.DataFrame] = {}
        new_entries: dict[str, dict] = {}
        for key, path in sources.items():
            previous = old_datasets.get(key)
            if previous is not None and previous["sha256"] == file_sha256(path):
                update.unchanged.append(key)
                continue
            digest, catalog = _read_source(path)
            rows, n_without = positioned_rows(catalog, str(path))
            new_rows[key] = rows
            new_entries[key] = {
                "source": path.relative_to(Store.of(root).root).as_posix(),
                "sha256": digest,
                "rows": rows.height,
                "rows_without_position": n_without,
            }
            (update.replaced if previous is not None else update.added).append(key)
        update.removed = sorted(set(old_datasets) - set(sources))
        if not update.changed:
            return _summarize(update, final, manifest, started)
        say(
            f"sky catalog: add {update.added}, replace {update.replaced}, "
            f"remove {update.removed}, {len(update.unchanged)} unchanged"
        )
        with Store.publish(final) as tmp:
            manifest = _publish(
                final, tmp, manifest, new_rows, new_entries, update, layout, dask_threads, say
            )
        return _summarize(update, final, manifest, started)


def _publish(
    final: Path,
    tmp: Path,
    manifest: dict,
    new_rows: dict[str, pl.DataFrame],
    new_entries: dict[str, dict],
    update: SkyCatalogUpdate,
    layout: SkyLayout,
    dask_threads: int,
    say: Callable[[str], None],
) -> dict:
    """Write the next version of the collection into ``tmp``; return its manifest."""
    from hats.catalog import TableProperties
    from hats.catalog.dataset.collection_properties import CollectionProperties
    from hats.pixel_math.spatial_index import compute_spatial_index

    old_catalog = final / PRIMARY_NAME
    has_old = (old_catalog / "partition_info.csv").is_file()
    pixel_rows = pl.DataFrame(
        manifest["pixel_rows"],
        schema={"order": pl.Int64, "pixel": pl.Int64, "dataset": pl.String, "rows": pl.Int64},
    )
    old_pixels = (
        pixel_rows.select("order", "pixel").unique().sort("order", "pixel").to_numpy()
        if has_old
        else np.zeros((0, 2), np.int64)
    )
    outgoing = set(new_entries) | set(update.removed)

    # Touched pixels: they hold rows of an outgoing dataset, or a new row falls in them.
    touched = np.zeros(len(old_pixels), dtype=bool)
    held = pixel_rows.filter(pl.col("dataset").is_in(sorted(outgoing)))
    held_keys = {(o, p) for o, p in held.select("order", "pixel").iter_rows()}
    for i, (o, p) in enumerate(old_pixels):
        touched[i] = (int(o), int(p)) in held_keys
    for rows in new_rows.values():
        if rows.height:
            h29 = compute_spatial_index(rows[RA_COLUMN].to_numpy(), rows[DEC_COLUMN].to_numpy())
            idx = _tree_index(old_pixels, h29, HEALPIX_INDEX_ORDER)
            touched[idx[idx >= 0]] = True

    staging = tmp / ".staging"
    inputs_dir = staging / "inputs"
    inputs_dir.mkdir(parents=True)
    inputs, n_input = [], 0
    for rows in new_rows.values():
        if rows.height:
            path = inputs_dir / f"new-{len(inputs):05d}.parquet"
            rows.write_parquet(path)
            inputs.append(path)
            n_input += rows.height
    for o, p in old_pixels[touched]:
        file = _pixel_file(old_catalog, int(o), int(p))
        kept = pl.read_parquet(file, hive_partitioning=False).drop(HEALPIX_COLUMN)
        kept = validate_catalog(
            kept.filter(~pl.col("dataset").is_in(sorted(outgoing))), source=str(file)
        )
        if kept.height:
            path = inputs_dir / f"keep-{len(inputs):05d}.parquet"
            kept.write_parquet(path)
            inputs.append(path)
            n_input += kept.height
    untouched = old_pixels[~touched]
    say(
        f"sky catalog: importing {n_input} rows ({len(inputs)} files) into the region of "
        f"{int(touched.sum())} touched pixel(s); {len(untouched)} pixel(s) kept"
    )

    catalog_dir = tmp / PRIMARY_NAME
    imported_pixels = np.zeros((0, 2), np.int64)
    properties = None
    if inputs:
        imported = _import_rows(
            inputs,
            staging,
            [(int(o), int(p)) for o, p in untouched],
            layout,
            n_input,
            dask_threads,
        )
        properties = TableProperties.read_from_dir(imported)
        from hats import read_hats

        imported_pixels = np.array(
            [(px.order, px.pixel) for px in read_hats(imported).get_healpix_pixels()],
            dtype=np.int64,
        ).reshape(-1, 2)
        for o, p in imported_pixels:
            dst = _pixel_file(catalog_dir, int(o), int(p))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_pixel_file(imported, int(o), int(p)), dst)
    elif has_old:
        properties = TableProperties.read_from_dir(old_catalog)
    for o, p in untouched:
        _link_or_copy(
            _pixel_file(old_catalog, int(o), int(p)), _pixel_file(catalog_dir, int(o), int(p))
        )

    # The pixel index: copied for untouched pixels, read from the new files for the others.
    untouched_keys = {(int(o), int(p)) for o, p in untouched}
    index_rows = [
        r for r in pixel_rows.iter_rows(named=True) if (r["order"], r["pixel"]) in untouched_keys
    ]
    for o, p in imported_pixels:
        counts = (
            pl.read_parquet(
                _pixel_file(catalog_dir, int(o), int(p)),
                columns=["dataset"],
                hive_partitioning=False,
            )
            .group_by("dataset")
            .len()
        )
        for dataset, n in counts.iter_rows():
            index_rows.append({"order": int(o), "pixel": int(p), "dataset": dataset, "rows": n})
    index_rows.sort(key=lambda r: (r["order"], r["pixel"], r["dataset"]))

    datasets = {k: v for k, v in manifest["datasets"].items() if k not in outgoing}
    datasets.update(new_entries)
    next_manifest = {
        "format": MANIFEST_FORMAT,
        "layout": {
            "pixel_threshold": layout.pixel_threshold,
            "lowest_order": layout.lowest_order,
            "highest_order": layout.highest_order,
            "margin_threshold_arcsec": layout.margin_threshold_arcsec,
            "margin_order": layout.margin_order,
        },
        "datasets": dict(sorted(datasets.items())),
        "pixel_rows": index_rows,
    }
    pixels = np.concatenate([untouched, imported_pixels]).reshape(-1, 2)
    update.rows_imported = n_input
    update.pixels_rewritten = len(imported_pixels)
    update.pixels_linked = len(untouched)
    if len(pixels):
        total = _write_catalog_metadata(catalog_dir, pixels, properties)
        expected = sum(r["rows"] for r in index_rows)
        if total != expected:
            raise SkyCatalogError(
                f"{catalog_dir}: wrote {total} rows, the pixel index counts {expected}"
            )
        schema = pq.read_schema(_pixel_file(catalog_dir, *pixels[0]))
        old_layout = manifest.get("layout", {})
        reuse_margin = has_old and old_layout.get("margin_order") == layout.margin_order
        old_margin = final / old_layout.get("margin_name", layout.margin_name)
        changed = [old_pixels[touched], imported_pixels]
        update.margin_rows, update.margin_pixels_rewritten = _build_margin(
            catalog_dir,
            tmp / layout.margin_name,
            pixels,
            changed,
            old_margin if reuse_margin else None,
            old_pixels,
            layout,
            schema,
        )
        next_manifest["layout"]["margin_name"] = layout.margin_name
        CollectionProperties(
            name=SKY_CATALOG_ASSET,
            hats_primary_table_url=PRIMARY_NAME,
            all_margins=[layout.margin_name],
            default_margin=layout.margin_name,
        ).to_properties_file(tmp)
    shutil.rmtree(staging)
    (tmp / MANIFEST_FILE).write_text(json.dumps(next_manifest, indent=1) + "\n")
    return next_manifest


def manifest_version(manifest: dict) -> str:
    """16-hex content version of a published state: SHA-256 of its sources' hashes and layout."""
    canonical = json.dumps(
        {"datasets": manifest["datasets"], "layout": manifest.get("layout", {})}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def verify_sky_catalog(root: Path | str) -> list[str]:
    """Problems of the published sky catalog (empty when sound).

    Strict HATS validation of the collection (``hats.io.validation.is_valid_catalog``:
    properties, ``partition_info.csv``, ``_metadata`` and the pixel files agree), and the row
    counts of the catalog, its ``_metadata`` and the manifest agree. With no position
    published yet, only that nothing but the manifest is there.
    """
    from hats.catalog import TableProperties
    from hats.io.validation import is_valid_catalog

    path = sky_catalog_dir(root)
    manifest = read_manifest(path)
    expected = sum(int(v["rows"]) for v in manifest["datasets"].values())
    if not (path / "collection.properties").is_file():
        return [] if expected == 0 else [f"{path}: manifest counts {expected} rows, no catalog"]
    problems = []
    if not is_valid_catalog(path, strict=True):
        problems.append(f"{path}: not a valid HATS collection (hats strict validation)")
    catalog_dir = path / PRIMARY_NAME
    total = TableProperties.read_from_dir(catalog_dir).total_rows
    metadata_rows = pq.read_metadata(catalog_dir / "dataset" / "_metadata").num_rows
    if not total == metadata_rows == expected:
        problems.append(
            f"{catalog_dir}: properties count {total} rows, _metadata {metadata_rows}, "
            f"the manifest {expected}"
        )
    margin = path / manifest["layout"]["margin_name"]
    if not (margin / "partition_info.csv").is_file():
        problems.append(f"{margin}: margin cache missing")
    return problems


def _summarize(
    update: SkyCatalogUpdate, final: Path, manifest: dict, started: float
) -> SkyCatalogUpdate:
    datasets = manifest["datasets"]
    update.rows_without_position = {k: int(v["rows_without_position"]) for k, v in datasets.items()}
    update.total_rows = sum(int(v["rows"]) for v in datasets.values())
    pixels = {(r["order"], r["pixel"]) for r in manifest["pixel_rows"]}
    update.n_pixels = len(pixels)
    update.orders = sorted({o for o, _ in pixels})
    if (final / "collection.properties").is_file():
        update.path = final
        if not update.margin_rows:
            from hats.catalog import TableProperties

            margin = final / manifest["layout"]["margin_name"]
            update.margin_rows = int(TableProperties.read_from_dir(margin).total_rows or 0)
    update.version = manifest_version(manifest)
    update.seconds = time.perf_counter() - started
    return update
