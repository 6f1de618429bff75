"""Sky catalog: HATS publish throughput, incremental cost per batch, LSDB cone-search latency.

What is real: :func:`gampen_ml.sky_catalog.publish_sky_catalog` (hats-import partitioning,
hard-linked untouched pixels, margin cache, metadata, atomic swap) on schema-valid
posterior catalogs written by :func:`gampen_ml.catalog.write_catalog`, read back with
``lsdb``. What is synthetic: the rows (random posterior columns) and the sky: batches are
1° x 1° tiles side by side at survey density (``--density`` galaxies per deg², HSC-Wide
depth), one tile per batch as the inbox delivers them.

Measured per size N (``--sizes``, tiles of ``--tile-rows``):

* incremental: the N/tile-rows tiles published one after the other (what the sky_catalog
  asset does as batches arrive): seconds per batch, rows re-imported, pixels rewritten;
* bulk: all tiles published at once into an empty catalog (import throughput);
* reference: hats-import's own pipeline (catalog + margin) rebuilding the same N rows from
  scratch, the cost an incremental publish avoids;
* on-disk size: bytes per row of the pixel files, files, HEALPix orders;
* cone search: ``lsdb`` open + ``cone_search`` + compute (median of ``--cones`` random cones
  in the footprint) against a brute-force scan (polars over every pixel file, astropy
  angular separation), which must return the same ids.

Run::

    .venv/bin/python -m benchmarks.bench_sky_catalog [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.catalog import CATALOG_SCHEMA, write_catalog
from gampen_ml.sky_catalog import (
    DEC_COLUMN,
    PRIMARY_NAME,
    RA_COLUMN,
    SkyLayout,
    open_sky_catalog,
    publish_sky_catalog,
    sky_catalog_dir,
)
from gampen_ml.store import CATALOG_FILE, POSTERIOR_CATALOG, Store

HERE = Path(__file__).resolve().parent
TILE_DEG = 1.0
TILES_PER_ROW = 5


def schema_rows(rng: np.random.Generator, n: int, first_id: int = 0) -> pl.DataFrame:
    """``n`` rows of every catalog column with valid dtypes: random floats, ids from
    ``first_id``, placeholder text; positions and ``dataset`` are the caller's to set."""
    columns = {}
    for name, dtype in CATALOG_SCHEMA.items():
        if dtype == pl.Float64:
            columns[name] = rng.random(n)
        elif dtype == pl.Int32:
            columns[name] = np.full(n, 300, np.int32)
        elif dtype == pl.Boolean:
            columns[name] = np.ones(n, bool)
        elif dtype == pl.Int64:
            columns[name] = np.arange(n) + first_id
        else:
            columns[name] = [f"{name}-x"] * n
    return pl.DataFrame(columns).cast(CATALOG_SCHEMA)


def tile_catalog(rng: np.random.Generator, index: int, n: int) -> pl.DataFrame:
    """``n`` schema-valid rows uniform in tile ``index`` (1° x 1°, 5 tiles per row of sky)."""
    ra0 = 150.0 + TILE_DEG * (index % TILES_PER_ROW)
    dec0 = 1.0 + TILE_DEG * (index // TILES_PER_ROW)
    sin_lo, sin_hi = np.sin(np.radians([dec0, dec0 + TILE_DEG]))
    return schema_rows(rng, n, first_id=index * 10_000_000).with_columns(
        dataset=pl.lit(f"tile-{index:03d}"),
        ra_deg=pl.Series(rng.uniform(ra0, ra0 + TILE_DEG, n)),
        dec_deg=pl.Series(np.degrees(np.arcsin(rng.uniform(sin_lo, sin_hi, n)))),
    )


def folder_bytes(folder: Path, pattern: str = "Npix=*") -> tuple[int, int]:
    files = list(folder.rglob(pattern))
    return sum(f.stat().st_size for f in files), len(files)


def reference_rebuild(root: Path, work: Path, layout: SkyLayout) -> float:
    """hats-import's catalog + margin pipelines over every source file, from scratch."""
    from dask.distributed import Client
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.margin_cache.margin_cache_arguments import MarginCacheArguments
    from hats_import.pipeline import pipeline_with_client

    inputs = []
    for i, source in enumerate(Store(root).catalog_files().values()):
        inputs.append(work / f"in-{i:04d}.parquet")
        shutil.copy(source, inputs[-1])
    t0 = time.perf_counter()
    with Client(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c:
        pipeline_with_client(
            ImportArguments(
                output_path=work,
                output_artifact_name="reference",
                input_file_list=inputs,
                file_reader="parquet",
                ra_column=RA_COLUMN,
                dec_column=DEC_COLUMN,
                pixel_threshold=layout.pixel_threshold,
                highest_healpix_order=layout.highest_order,
                should_write_skymap=False,
                progress_bar=False,
                tmp_dir=work / "tmp",
            ),
            c,
        )
        pipeline_with_client(
            MarginCacheArguments(
                input_catalog_path=work / "reference",
                output_path=work,
                output_artifact_name="reference_margin",
                margin_threshold=layout.margin_threshold_arcsec,
                progress_bar=False,
                tmp_dir=work / "tmp-margin",
            ),
            c,
        )
    return time.perf_counter() - t0


def cone_latency(root: Path, n_tiles: int, radius_deg: float, cones: int):
    """Median seconds of an lsdb cone search and of a brute-force scan; checks they agree."""
    from astropy import units as u
    from astropy.coordinates import angular_separation

    rng = np.random.default_rng(1)
    dataset = sky_catalog_dir(root) / PRIMARY_NAME / "dataset"
    lsdb_s, brute_s = [], []
    for _ in range(cones):
        tile = int(rng.integers(n_tiles))
        ra = 150.0 + TILE_DEG * (tile % TILES_PER_ROW) + rng.uniform(0, TILE_DEG)
        dec = 1.0 + TILE_DEG * (tile // TILES_PER_ROW) + rng.uniform(0, TILE_DEG)
        t0 = time.perf_counter()
        found = (
            open_sky_catalog(root, columns=["galaxy_id", RA_COLUMN, DEC_COLUMN])
            .cone_search(ra, dec, radius_deg * 3600.0)
            .compute(progress_bar=False)
        )
        lsdb_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scan = pl.read_parquet(
            dataset / "**" / "*.parquet", columns=["galaxy_id", RA_COLUMN, DEC_COLUMN]
        )
        sep = angular_separation(
            scan[RA_COLUMN].to_numpy() * u.deg,
            scan[DEC_COLUMN].to_numpy() * u.deg,
            ra * u.deg,
            dec * u.deg,
        ).to_value(u.deg)
        expected = set(scan.filter(pl.Series(sep <= radius_deg))["galaxy_id"].to_list())
        brute_s.append(time.perf_counter() - t0)
        if set(found["galaxy_id"]) != expected:
            raise AssertionError(f"cone ({ra}, {dec}, {radius_deg}°): lsdb != brute force")
    return statistics.median(lsdb_s), statistics.median(brute_s), len(found)


def run_size(n: int, args, layout: SkyLayout) -> dict:
    n_tiles = max(1, n // args.tile_rows)
    rng = np.random.default_rng(n)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        incremental_root, bulk_root = tmp / "incremental", tmp / "bulk"
        incremental, bulk_store = Store(incremental_root), Store(bulk_root)
        per_batch = []
        for i in range(n_tiles):
            df = tile_catalog(rng, i, args.tile_rows)
            write_catalog(incremental.catalog(f"tile-{i:03d}"), df)
            update = publish_sky_catalog(incremental_root, layout=layout)
            per_batch.append(update)
            print(
                f"  batch {i + 1}/{n_tiles}: {update.seconds:6.1f} s, {update.rows_imported:>8} "
                f"rows imported, {update.pixels_rewritten} pixels rewritten, "
                f"{update.pixels_linked} linked; catalog {update.total_rows} rows",
                flush=True,
            )
        shutil.copytree(
            incremental.asset_dir(POSTERIOR_CATALOG), bulk_store.asset_dir(POSTERIOR_CATALOG)
        )
        bulk = publish_sky_catalog(bulk_root, layout=layout)
        print(f"  bulk: {bulk.seconds:.1f} s for {bulk.total_rows} rows", flush=True)
        catalog_bytes, n_files = folder_bytes(sky_catalog_dir(bulk_root) / PRIMARY_NAME)
        margin_bytes, _ = folder_bytes(sky_catalog_dir(bulk_root) / layout.margin_name)
        source_bytes, _ = folder_bytes(bulk_store.asset_dir(POSTERIOR_CATALOG), CATALOG_FILE)
        ref_s = None
        if n <= args.reference_max:
            work = tmp / "reference"
            work.mkdir()
            ref_s = reference_rebuild(bulk_root, work, layout)
            print(f"  hats-import rebuild (catalog + margin): {ref_s:.1f} s", flush=True)
        lsdb_s, brute_s, n_found = cone_latency(
            bulk_root, n_tiles, args.cone_radius_deg, args.cones
        )
        print(f"  cone {args.cone_radius_deg}°: lsdb {lsdb_s:.2f} s, scan {brute_s:.2f} s")
    last = per_batch[-1]
    return {
        "n": bulk.total_rows,
        "tiles": n_tiles,
        "bulk_s": bulk.seconds,
        "bulk_rate": bulk.total_rows / bulk.seconds,
        "batch_s_first": per_batch[0].seconds,
        "batch_s_last": last.seconds,
        "batch_s_mean": statistics.mean(u.seconds for u in per_batch),
        "last_imported": last.rows_imported,
        "last_rewritten": last.pixels_rewritten,
        "last_linked": last.pixels_linked,
        "ref_s": ref_s,
        "bytes_per_row": catalog_bytes / bulk.total_rows,
        "source_bytes_per_row": source_bytes / bulk.total_rows,
        "margin_fraction": bulk.margin_rows / bulk.total_rows,
        "margin_bytes": margin_bytes,
        "files": n_files,
        "orders": bulk.orders,
        "lsdb_s": lsdb_s,
        "brute_s": brute_s,
        "cone_rows": n_found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--tile-rows", type=int, default=100_000)
    parser.add_argument("--pixel-threshold", type=int, default=SkyLayout().pixel_threshold)
    parser.add_argument("--cones", type=int, default=5)
    parser.add_argument("--cone-radius-deg", type=float, default=0.1)
    parser.add_argument("--reference-max", type=int, default=1_000_000)
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sky_catalog.md")
    args = parser.parse_args()
    layout = SkyLayout(pixel_threshold=args.pixel_threshold)
    results = []
    for n in args.sizes:
        print(f"N = {n}", flush=True)
        results.append(run_size(n, args, layout))
    command = (
        "    .venv/bin/python -m benchmarks.bench_sky_catalog --sizes "
        + " ".join(str(n) for n in args.sizes)
        + f" --tile-rows {args.tile_rows} --pixel-threshold {args.pixel_threshold}"
        f" --cones {args.cones} --cone-radius-deg {args.cone_radius_deg}"
    )
    lines = [
        "# Sky catalog: HATS publish and LSDB cone search",
        "",
        "Command:",
        "",
        command,
        "",
        "`gampen_ml.sky_catalog.publish_sky_catalog` on synthetic schema-valid posterior "
        f"catalogs, one batch per 1° x 1° tile of {args.tile_rows:,} galaxies (survey density), "
        f"default `SkyLayout` (≤ {args.pixel_threshold:,} rows per pixel, orders "
        f"{layout.lowest_order}-{layout.highest_order}, {layout.margin_threshold_arcsec:g}″ margin); hats-import runs "
        "on an in-process Dask worker with 2 threads. Incremental = the tiles published one by "
        "one as batches arrive; bulk = all at once into an empty catalog; hats-import rebuild = "
        "its catalog + margin pipelines from scratch over the same rows.",
        "",
        "| rows | tiles | bulk publish s (rows/s) | incremental s per batch: first / mean / last "
        "| last batch: rows re-imported, pixels rewritten / kept | hats-import rebuild s "
        "| pixel files (orders) | bytes/row on disk (source catalog.parquet) | margin rows "
        f"| cone {args.cone_radius_deg}° lsdb s / scan s (rows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = f"{r['ref_s']:.1f}" if r["ref_s"] is not None else "not run"
        lines.append(
            f"| {r['n']:,} | {r['tiles']} | {r['bulk_s']:.1f} ({r['bulk_rate']:,.0f}) "
            f"| {r['batch_s_first']:.1f} / {r['batch_s_mean']:.1f} / {r['batch_s_last']:.1f} "
            f"| {r['last_imported']:,}, {r['last_rewritten']} / {r['last_linked']} | {ref} "
            f"| {r['files']} ({', '.join(map(str, r['orders']))}) "
            f"| {r['bytes_per_row']:.0f} ({r['source_bytes_per_row']:.0f}) "
            f"| {r['margin_fraction']:.2%} | {r['lsdb_s']:.2f} / {r['brute_s']:.2f} "
            f"({r['cone_rows']}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
