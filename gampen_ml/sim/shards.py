"""Shards of simulated galaxies: a memory-mappable image stack plus a labels table.

A shard ``shard-NNN`` holds galaxies ``NNN``-th slice of ``range(n_galaxies)`` split evenly
over ``n_shards`` (so ``galaxy_id`` is unique across shards). Everything random in a shard
comes from one generator seeded with ``derive_seed(profile.seed, "simulated_galaxies",
shard_key)``: the parameters, the PSF choice, the train/val/test split (exact fractions of
the shard through a seeded permutation) and one noise seed per galaxy. Rendering is
deterministic and each galaxy's noise comes from its own seed, so the bytes written do not
depend on ``n_workers``.

Files written into ``out_dir`` (the caller wraps it in ``gampen_ml.io.atomic_partition_dir``):

``images.npy``
    ``(N, S, S)`` float32, nJy per pixel: PSF-convolved galaxy plus noise drawn from the
    pool. Written through a ``.npy`` memory map so a shard never has to fit in RAM twice.
``labels.parquet``
    ``galaxy_id`` int64, ``shard`` str, ``split`` str, ``seed`` int64 (the galaxy's noise
    seed), ``psf_id`` int32, ``noise_scale`` float64 (the factor on the pool's noise,
    log-uniform in ``NoiseConfig.depth_scale_range``, drawn from its own stream), then
    :data:`gampen_ml.sim.parameters.PARAMETER_COLUMNS` (Sérsic indices on the
    :data:`gampen_ml.sim.render.SERSIC_N_STEP` grid that was rendered).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.config import ImagingConfig, Profile, derive_seed, shard_keys
from gampen_ml.io import StorageError, load_npy_mmap
from gampen_ml.sim.noise import draw_noise, read_noise_pool
from gampen_ml.sim.parameters import PARAMETER_COLUMNS, quantize_sersic_n, sample_parameters
from gampen_ml.sim.psf import read_psf_library
from gampen_ml.sim.render import SERSIC_N_STEP, FastRenderer
from gampen_ml.store import IMAGES_FILE, LABELS_FILE, SIMULATED_GALAXIES

#: Columns and dtypes of ``labels.parquet``, in order (what :func:`shard_labels` builds).
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "galaxy_id": pl.Int64(),
    "shard": pl.String(),
    "split": pl.String(),
    "seed": pl.Int64(),
    "psf_id": pl.Int32(),
    "noise_scale": pl.Float64(),
    **{c: pl.String() if c == "component" else pl.Float64() for c in PARAMETER_COLUMNS},
}
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: Galaxies per task handed to a worker process.
CHUNK_GALAXIES = 64


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`simulate_shard` wrote."""

    shard: str
    n_galaxies: int
    first_galaxy_id: int
    n_train: int
    n_val: int
    n_test: int
    n_workers: int
    wall_s: float
    images_path: Path
    labels_path: Path

    @property
    def galaxies_per_s(self) -> float:
        """Rendering throughput of the whole shard."""
        return self.n_galaxies / self.wall_s if self.wall_s > 0 else float("inf")


def shard_galaxy_ids(profile: Profile, shard_key: str) -> np.ndarray:
    """Galaxy ids ``(n,)`` int64 of ``shard_key``: an even, contiguous split of all galaxies."""
    keys = shard_keys(profile)
    if shard_key not in keys:
        raise ValueError(
            f"profile {profile.name!r}: unknown shard key {shard_key!r} (have {keys[0]}..{keys[-1]})"
        )
    parts = np.array_split(np.arange(profile.simulation.n_galaxies, dtype=np.int64), len(keys))
    return parts[keys.index(shard_key)]


def assign_splits(
    n: int, fractions: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """``(n,)`` str array of ``train|val|test`` with exact counts, randomly placed."""
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    n_val = min(n_val, n - n_train)
    labels = np.repeat(np.array(SPLITS), [n_train, n_val, n - n_train - n_val])
    return labels[rng.permutation(n)]


def shard_labels(profile: Profile, shard_key: str, n_psfs: int) -> pl.DataFrame:
    """The labels table of a shard (everything but the pixels), deterministic in the profile."""
    ids = shard_galaxy_ids(profile, shard_key)
    rng = np.random.default_rng(derive_seed(profile.seed, SIMULATED_GALAXIES, shard_key))
    n = len(ids)
    params = sample_parameters(profile.simulation.priors, n, rng)
    params = quantize_sersic_n(params, SERSIC_N_STEP)
    psf_id = rng.integers(0, n_psfs, size=n).astype(np.int32)
    split = assign_splits(n, profile.simulation.split_fractions, rng)
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    lo, hi = profile.noise.depth_scale_range
    depth_rng = np.random.default_rng(
        derive_seed(profile.seed, f"{SIMULATED_GALAXIES}/depth", shard_key)
    )
    noise_scale = np.exp(depth_rng.uniform(np.log(lo), np.log(hi), size=n))
    head = pl.DataFrame(
        {
            "galaxy_id": pl.Series(ids, dtype=pl.Int64),
            "shard": pl.Series([shard_key] * n, dtype=pl.String),
            "split": pl.Series(split, dtype=pl.String),
            "seed": pl.Series(seeds, dtype=pl.Int64),
            "psf_id": pl.Series(psf_id, dtype=pl.Int32),
            "noise_scale": pl.Series(noise_scale, dtype=pl.Float64),
        }
    )
    return pl.concat([head, params.select(PARAMETER_COLUMNS)], how="horizontal")


def _render_chunk(
    images_path: str,
    psf_dir: str,
    noise_dir: str,
    imaging: ImagingConfig,
    rows: np.ndarray,
    chunk: pl.DataFrame,
) -> int:
    """Worker: render ``chunk`` (the labels of shard rows ``rows``) plus noise into the memmap."""
    pool = read_noise_pool(noise_dir)
    renderer = _cached_renderer(psf_dir, imaging)
    images = renderer.render(chunk, chunk["psf_id"].to_numpy())
    s = imaging.stamp_size_px
    scales = chunk["noise_scale"].to_numpy().astype(np.float32)
    for k, seed in enumerate(chunk["seed"].to_numpy()):
        images[k] += scales[k] * draw_noise(pool, (s, s), np.random.default_rng(int(seed)))
    out = np.load(images_path, mmap_mode="r+")
    out[rows] = images
    out.flush()
    return len(rows)


_LIBRARIES: dict[str, tuple] = {}
_RENDERERS: dict[tuple, FastRenderer] = {}


def _cached_library(psf_dir: str):
    if psf_dir not in _LIBRARIES:
        _LIBRARIES[psf_dir] = read_psf_library(psf_dir)
    return _LIBRARIES[psf_dir]


def _cached_renderer(psf_dir: str, imaging: ImagingConfig) -> FastRenderer:
    # One renderer per process keeps its PSF profiles (and GalSim's Sérsic caches) warm.
    key = (psf_dir, imaging)
    if key not in _RENDERERS:
        _RENDERERS[key] = FastRenderer(_cached_library(psf_dir)[0], imaging)
    return _RENDERERS[key]


def _chunks(labels: pl.DataFrame, n_chunks: int) -> list[np.ndarray]:
    # Contiguous runs in bulge/disk-index order: each worker meets few distinct indices.
    order = np.lexsort(
        (
            labels["disk_n"].fill_null(-1.0).to_numpy(),
            labels["bulge_n"].fill_null(-1.0).to_numpy(),
        )
    )
    return [np.sort(c) for c in np.array_split(order, n_chunks) if len(c)]


def simulate_shard(
    profile: Profile,
    shard_key: str,
    psf_dir: Path | str,
    noise_dir: Path | str,
    out_dir: Path | str,
    n_workers: int | None = None,
) -> ShardSummary:
    """Simulate one shard of galaxies and write ``images.npy`` and ``labels.parquet``.

    Parameters
    ----------
    profile : Profile
        Counts, priors, split fractions, imaging and seed.
    shard_key : str
        ``shard-NNN``, one of ``shard_keys(profile)``.
    psf_dir, noise_dir : path-like
        Folders written by ``write_psf_library`` and ``write_noise_pool``.
    out_dir : path-like
        Existing folder to write into (normally the temporary folder of
        ``atomic_partition_dir``).
    n_workers : int, optional
        Worker processes (default: the CPUs available to this process). ``1`` renders in
        this process. The output does not depend on it.

    Returns
    -------
    ShardSummary
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise StorageError(f"shard output folder {out_dir} does not exist")
    psf_dir, noise_dir = str(Path(psf_dir).resolve()), str(Path(noise_dir).resolve())
    _, psf_table = read_psf_library(psf_dir)
    labels = shard_labels(profile, shard_key, psf_table.height)
    n, s = labels.height, profile.imaging.stamp_size_px
    images_path = out_dir / IMAGES_FILE
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.float32, shape=(n, s, s))
    del images  # header and size are on disk; workers fill it through their own maps
    if n_workers is None:
        n_workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    n_workers = max(1, min(int(n_workers), n))
    n_chunks = max(n_workers, int(np.ceil(n / CHUNK_GALAXIES)))
    chunks = _chunks(labels, n_chunks)
    args = (str(images_path), psf_dir, noise_dir, profile.imaging)
    if n_workers == 1:
        for rows in chunks:
            _render_chunk(*args, rows, labels[rows])
    else:
        # spawn: safe whatever threads the parent runs (Dagster, torch); chunks are ordered by
        # Sérsic index and handed out in order, so each worker's caches stay warm.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            done = sum(
                pool.map(
                    _render_chunk,
                    *zip(*[(*args, rows, labels[rows]) for rows in chunks], strict=True),
                )
            )
        if done != n:
            raise RuntimeError(f"shard {shard_key}: rendered {done} of {n} galaxies")
    labels_path = out_dir / LABELS_FILE
    labels.write_parquet(labels_path)
    counts = {k: int((labels["split"] == k).sum()) for k in SPLITS}
    return ShardSummary(
        shard=shard_key,
        n_galaxies=n,
        first_galaxy_id=int(labels["galaxy_id"][0]),
        n_train=counts["train"],
        n_val=counts["val"],
        n_test=counts["test"],
        n_workers=n_workers,
        wall_s=time.perf_counter() - start,
        images_path=images_path,
        labels_path=labels_path,
    )


def open_shard(folder: Path | str) -> tuple[np.ndarray, pl.DataFrame]:
    """Memory-map a shard: ``(images (N, S, S) float32 read-only memmap, labels DataFrame)``."""
    folder = Path(folder)
    labels_path = folder / LABELS_FILE
    if not labels_path.is_file():
        raise StorageError(f"missing shard labels {labels_path}")
    images = load_npy_mmap(folder / IMAGES_FILE)
    labels = pl.read_parquet(labels_path)
    if images.shape[0] != labels.height:
        raise StorageError(f"shard {folder}: {images.shape[0]} images but {labels.height} labels")
    return images, labels
