"""The HATS sky catalog on a synthetic 10⁵-row survey: LSDB cone search, cross-match, increments.

Three sky tiles (RA 0-120°, 120-240°, 240-360°, uniform on the sphere) of schema-valid
catalog rows, plus a ``sim-test`` partition without positions. The first publish holds two
tiles; the third arrives as a new batch. A small ``pixel_threshold`` makes ~50 pixels so
that pixel borders, the margin cache and untouched pixels all matter.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import astropy.units as u
import distributed
import lsdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord, angular_separation

from benchmarks.bench_sky_catalog import schema_rows
from gampen_ml.catalog import validate_catalog, write_catalog
from gampen_ml.sky_catalog import (
    HEALPIX_COLUMN,
    PRIMARY_NAME,
    SkyCatalogError,
    SkyLayout,
    _negative_tree,
    _tree_index,
    open_sky_catalog,
    publish_sky_catalog,
    read_manifest,
    sky_catalog_dir,
)

# Pixels of order 1-2 (~50) and a 60" margin: enough pixel borders for the cross-match test,
# few enough files to keep the per-pixel costs of hats-import small.
LAYOUT = SkyLayout(
    pixel_threshold=4_000, lowest_order=0, highest_order=6, margin_threshold_arcsec=60.0
)
N_TILE = 33_334
TILES = {"tile-a": (0.0, 120.0), "tile-b": (120.0, 240.0), "tile-c": (240.0, 360.0)}
N_SIM = 500


def synthetic_catalog(
    rng: np.random.Generator, n: int, dataset: str, ra_range_deg: tuple[float, float] | None
) -> pl.DataFrame:
    """``n`` schema-valid catalog rows, uniform on the sphere within an RA range (None: no position)."""
    df = schema_rows(rng, n)
    # Nulls where the schema allows them (real cutouts: no truth, sometimes no PSF or HDU).
    every_third = pl.int_range(0, n) % 3 == 0
    df = df.with_columns(
        pl.when(every_third).then(None).otherwise(pl.col(c)).alias(c)
        for c in ("hdu", "source_file", "psf_fwhm_arcsec", "bt_true", "component_true")
    )
    # Galaxy ids unique over the whole survey, so a match is identified by its id alone.
    offset = {"sim-test": 9_000_000, **{k: i * 1_000_000 for i, k in enumerate(TILES)}}[dataset]
    df = df.with_columns(galaxy_id=pl.Series(np.arange(n) + offset), dataset=pl.lit(dataset))
    if ra_range_deg is None:
        return df.with_columns(ra_deg=pl.lit(None, pl.Float64), dec_deg=pl.lit(None, pl.Float64))
    ra = rng.uniform(*ra_range_deg, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return df.with_columns(ra_deg=pl.Series(ra), dec_deg=pl.Series(dec))


def write_partition(root: Path, df: pl.DataFrame) -> None:
    write_catalog(root / "posterior_catalog" / df["dataset"][0], df)


def pixel_inodes(root: Path) -> dict[str, int]:
    dataset = sky_catalog_dir(root) / PRIMARY_NAME / "dataset"
    return {str(p.relative_to(dataset)): p.stat().st_ino for p in dataset.rglob("Npix=*")}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Publish tiles a, b and sim-test, then tile c as a new batch; keep what each call did."""
    root = tmp_path_factory.mktemp("sky") / "storage"
    rng = np.random.default_rng(20)
    tiles = {k: synthetic_catalog(rng, N_TILE, k, r) for k, r in TILES.items()}
    write_partition(root, tiles["tile-a"])
    write_partition(root, tiles["tile-b"])
    write_partition(root, synthetic_catalog(rng, N_SIM, "sim-test", None))
    threads_before = {t.ident for t in threading.enumerate()}
    first = publish_sky_catalog(root, layout=LAYOUT)
    inodes_first = pixel_inodes(root)
    write_partition(root, tiles["tile-c"])
    second = publish_sky_catalog(root, layout=LAYOUT)
    leftover_threads = [
        t for t in threading.enumerate() if t.ident not in threads_before and not t.daemon
    ]
    rows = pl.concat(tiles.values())
    return {
        "root": root,
        "first": first,
        "second": second,
        "inodes_first": inodes_first,
        "inodes_second": pixel_inodes(root),
        "rows": rows,
        "leftover_threads": leftover_threads,
    }


@pytest.mark.slow
def test_publish_counts_rows_and_leaves_out_rows_without_position(survey):
    first, second = survey["first"], survey["second"]
    assert first.added == ["sim-test", "tile-a", "tile-b"]
    assert first.total_rows == 2 * N_TILE
    assert second.added == ["tile-c"] and second.unchanged == ["sim-test", "tile-a", "tile-b"]
    assert second.total_rows == 3 * N_TILE
    assert second.rows_without_position == {"sim-test": N_SIM, **dict.fromkeys(TILES, 0)}
    # Pixels: many, under the threshold, at the orders reported.
    assert second.n_pixels > 40
    catalog = open_sky_catalog(survey["root"])
    files = (sky_catalog_dir(survey["root"]) / PRIMARY_NAME / "dataset").rglob("Npix=*")
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert len(sizes) == second.n_pixels == len(catalog.get_healpix_pixels())
    assert sum(sizes) == 3 * N_TILE and max(sizes) <= LAYOUT.pixel_threshold
    assert sorted({p.order for p in catalog.get_healpix_pixels()}) == second.orders
    # Every row and value as written (nulls and dtypes too), once.
    published = pl.from_pandas(catalog.compute().reset_index(drop=True))
    published = validate_catalog(published.drop(HEALPIX_COLUMN, strict=False))
    assert published.sort("galaxy_id").equals(survey["rows"].sort("galaxy_id"))
    # Nothing of the build is left behind: no Dask client or thread, no temporary folder.
    assert survey["leftover_threads"] == []
    with pytest.raises(ValueError, match="No global client"):
        distributed.get_client()
    assert sorted(p.name for p in sky_catalog_dir(survey["root"]).parent.iterdir()) == [
        ".lock",
        "all",
    ]


@pytest.mark.slow
def test_new_batch_rewrites_only_the_pixels_it_touches(survey):
    second = survey["second"]
    assert second.pixels_linked > 0 and second.pixels_rewritten > 0
    # Tile c's rows plus the other tiles' rows in the few pixels it shares with them.
    assert N_TILE <= second.rows_imported < 2 * N_TILE
    before, after = survey["inodes_first"], survey["inodes_second"]
    kept = [name for name in after if before.get(name) == after[name]]
    assert len(kept) == second.pixels_linked
    assert second.margin_pixels_rewritten < second.n_pixels + 12


CONES = [  # (ra, dec, radius arcsec): ordinary, north pole, south pole, across RA = 0, tiles
    (200.0, 35.0, 6 * 3600.0),
    (0.0, 90.0, 5 * 3600.0),
    (77.0, -89.0, 6 * 3600.0),
    (359.0, -10.0, 5 * 3600.0),
    (120.0, 0.0, 4.5 * 3600.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("cone", CONES, ids=["plain", "north-pole", "south-pole", "ra-0", "tiles"])
def test_cone_search_returns_exactly_the_brute_force_rows(survey, cone):
    ra, dec, radius_arcsec = cone
    rows = survey["rows"]
    separation = angular_separation(
        rows["ra_deg"].to_numpy() * u.deg,
        rows["dec_deg"].to_numpy() * u.deg,
        ra * u.deg,
        dec * u.deg,
    ).to_value(u.arcsec)
    expected = set(rows.filter(pl.Series(separation <= radius_arcsec))["galaxy_id"].to_list())
    assert len(expected) > 100
    found = open_sky_catalog(survey["root"]).cone_search(ra, dec, radius_arcsec).compute()
    assert set(found["galaxy_id"]) == expected and len(found) == len(expected)


@pytest.mark.slow
def test_crossmatch_finds_every_perturbed_pair_also_across_pixel_borders(survey, tmp_path):
    root, rows = survey["root"], survey["rows"]
    rng = np.random.default_rng(5)
    shift_arcsec = 50.0  # within the 60" margin
    origin = SkyCoord(rows["ra_deg"].to_numpy() * u.deg, rows["dec_deg"].to_numpy() * u.deg)
    moved = origin.directional_offset_by(
        rng.uniform(0, 360, len(rows)) * u.deg, shift_arcsec * u.arcsec
    )
    # The pairs whose two members lie in different pixels need the margin cache.
    from hats.pixel_math.spatial_index import compute_spatial_index

    pixels = np.array([(p.order, p.pixel) for p in open_sky_catalog(root).get_healpix_pixels()])
    pixel_of = [
        _tree_index(pixels, compute_spatial_index(c.ra.deg, c.dec.deg), 29) for c in (origin, moved)
    ]
    # Keep the pairs whose moved position has its own origin as nearest galaxy (a 1-nearest
    # crossmatch would rightly return a closer neighbour otherwise).
    nearest, _, _ = moved.match_to_catalog_sky(origin)
    own = nearest == np.arange(len(rows))
    crossing = np.flatnonzero((pixel_of[0] != pixel_of[1]) & own)
    assert len(crossing) >= 20
    chosen = np.union1d(crossing, rng.choice(np.flatnonzero(own), 1_500, replace=False))
    other = pl.DataFrame(
        {
            "source_id": rows["galaxy_id"].to_numpy()[chosen],
            "ra": moved.ra.deg[chosen],
            "dec": moved.dec.deg[chosen],
        }
    ).to_pandas()
    lsdb.from_dataframe(other, ra_column="ra", dec_column="dec", catalog_name="perturbed").to_hats(
        tmp_path / "perturbed"
    )
    perturbed = lsdb.open_catalog(tmp_path / "perturbed")

    matches = perturbed.crossmatch(
        open_sky_catalog(root),
        radius_arcsec=55.0,
        n_neighbors=1,
        suffixes=("", "_sky"),
        suffix_method="overlapping_columns",
    ).compute()
    assert len(matches) == len(chosen)
    assert (matches["source_id"] == matches["galaxy_id"]).all()
    assert np.allclose(matches["_dist_arcsec"], shift_arcsec, atol=1e-3)
    # Without the margin the border-crossing pairs are lost: the margin is what finds them.
    bare = lsdb.open_catalog(sky_catalog_dir(root) / PRIMARY_NAME)
    with pytest.warns(RuntimeWarning, match="margin"):
        bare_matches = perturbed.crossmatch(
            bare, radius_arcsec=55.0, n_neighbors=1, suffixes=("", "_sky")
        ).compute()
    assert len(bare_matches) <= len(chosen) - len(crossing) // 2


@pytest.mark.slow
def test_incremental_margin_equals_lsdbs_margin_of_the_final_catalog(survey):
    """After two publishes (one incremental), the margin is what LSDB builds from scratch."""
    from hats.pixel_tree.negative_tree import compute_negative_tree_pixels
    from lsdb.loaders.dataframe.margin_catalog_generator import MarginCatalogGenerator

    collection = sky_catalog_dir(survey["root"])
    catalog = lsdb.open_catalog(collection / PRIMARY_NAME)
    pixels = np.array([(p.order, p.pixel) for p in catalog.get_healpix_pixels()])
    negative = compute_negative_tree_pixels(catalog.hc_structure.pixel_tree)
    assert sorted(map(tuple, _negative_tree(pixels).tolist())) == sorted(
        (p.order, p.pixel) for p in negative
    )
    reference = MarginCatalogGenerator(
        catalog, margin_threshold=LAYOUT.margin_threshold_arcsec
    ).create_catalog()
    ours = lsdb.read_hats(collection / LAYOUT.margin_name)
    assert ours.hc_structure.catalog_info.margin_threshold == LAYOUT.margin_threshold_arcsec
    assert sorted(ours.get_healpix_pixels()) == sorted(reference.get_healpix_pixels())

    def rows_by_pixel(margin) -> set[tuple[int, int, int]]:
        tagged = margin.map_partitions(
            lambda df, pixel: df.assign(order=pixel.order, npix=pixel.pixel)[
                ["order", "npix", "galaxy_id"]
            ],
            include_pixel=True,
        ).compute()
        return set(tagged.itertuples(index=False, name=None))

    expected = rows_by_pixel(reference)
    assert rows_by_pixel(ours) == expected
    assert survey["second"].margin_rows == len(expected) > 0
    assert read_manifest(collection)["layout"]["margin_order"] == LAYOUT.margin_order


@pytest.mark.slow
def test_republish_is_idempotent_and_replaces_a_changed_batch(survey, tmp_path):
    root = tmp_path / "storage"
    shutil.copytree(survey["root"], root)
    before = read_manifest(sky_catalog_dir(root))
    inode = sky_catalog_dir(root).stat().st_ino

    same = publish_sky_catalog(root, layout=LAYOUT)
    assert not same.changed and same.version == survey["second"].version
    assert sky_catalog_dir(root).stat().st_ino == inode  # not rewritten

    # Tile b again, recomputed: 1,000 galaxies fewer and a new B/T for the rest.
    tile_b = survey["rows"].filter(pl.col("dataset") == "tile-b").slice(1_000)
    write_partition(root, tile_b.with_columns(bt_mode=pl.lit(0.25)))
    again = publish_sky_catalog(root, layout=LAYOUT)
    assert again.replaced == ["tile-b"] and again.total_rows == 3 * N_TILE - 1_000
    published = open_sky_catalog(root, columns=["galaxy_id", "dataset", "bt_mode"]).compute()
    assert len(published) == 3 * N_TILE - 1_000 and published["galaxy_id"].is_unique
    b_rows = published[published["dataset"] == "tile-b"]
    assert len(b_rows) == N_TILE - 1_000 and (b_rows["bt_mode"] == 0.25).all()
    assert (
        read_manifest(sky_catalog_dir(root))["datasets"]["tile-a"] == before["datasets"]["tile-a"]
    )

    # A dataset whose partition is gone leaves the sky catalog.
    shutil.rmtree(root / "posterior_catalog" / "tile-a")
    gone = publish_sky_catalog(root, layout=LAYOUT)
    assert gone.removed == ["tile-a"] and gone.total_rows == 2 * N_TILE - 1_000
    assert len(open_sky_catalog(root, columns=["galaxy_id"]).compute()) == gone.total_rows


def test_without_positions_nothing_is_published(tmp_path):
    root = tmp_path / "storage"
    write_partition(root, synthetic_catalog(np.random.default_rng(1), 50, "sim-test", None))
    update = publish_sky_catalog(root, layout=LAYOUT)
    assert update.path is None and update.total_rows == 0
    assert update.rows_without_position == {"sim-test": 50}
    with pytest.raises(SkyCatalogError, match="no sky catalog"):
        open_sky_catalog(root)


def test_a_declination_beyond_the_pole_is_an_error_naming_the_file(tmp_path):
    root = tmp_path / "storage"
    df = synthetic_catalog(np.random.default_rng(2), 20, "tile-a", (0.0, 10.0))
    write_partition(root, df.with_columns(dec_deg=pl.Series([95.0] + [1.0] * 19)))
    with pytest.raises(SkyCatalogError, match=r"tile-a/catalog.parquet.*dec_deg.*95"):
        publish_sky_catalog(root, layout=LAYOUT)
    assert not (sky_catalog_dir(root)).exists()
    assert os.listdir(sky_catalog_dir(root).parent) == [".lock"]


@pytest.mark.slow
def test_pixel_files_carry_the_healpix_index_sorted(survey):
    dataset = sky_catalog_dir(survey["root"]) / PRIMARY_NAME / "dataset"
    for file in sorted(dataset.rglob("Npix=*"))[:5]:
        index = pq.read_table(file, columns=[HEALPIX_COLUMN]).column(0).to_numpy()
        assert np.all(np.diff(index) >= 0)
