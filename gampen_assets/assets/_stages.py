"""Two stage functions the assets need that ``gampen_ml`` does not provide as one call yet.

Plain Python, no Dagster import: each composes ``gampen_ml`` functions (inference,
coverage, selection, recalibration, catalog) into the unit of work of one asset, so it can
move into ``gampen_ml`` unchanged (``gampen_ml.calibrate`` / ``gampen_ml.catalog``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.calibrate import (
    Recalibration,
    coverage_table,
    fit_recalibration,
    select_dropout_rate,
)
from gampen_ml.catalog import SAMPLES_FILE, catalog_from_images
from gampen_ml.config import PARAMETERS, Profile, derive_seed, dropout_key
from gampen_ml.data.datasets import ShardImages
from gampen_ml.infer import predict_physical
from gampen_ml.io import load_npy_mmap
from gampen_ml.posterior import summarize

#: Columns of the simulation labels that a catalog keeps as truths.
TRUTH_COLUMNS = (*PARAMETERS, "component")


class SplitImages:
    """Lazy ``(N, S, S)`` float32 view of one split over several shards.

    Slicing (``view[a:b]``) gathers only those galaxies from the memory-mapped shards, so
    MC-dropout inference streams a split of any size in chunks.
    """

    def __init__(self, data: ShardImages) -> None:
        self._data = data
        self.shape = (len(data), data.image_px, data.image_px)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError(f"SplitImages supports slices only, got {type(item).__name__}")
        return self._data.images(np.arange(self.shape[0])[item])


def split_inputs(
    shard_dirs: Sequence[Path | str], split: str
) -> tuple[SplitImages, pl.DataFrame, pl.DataFrame]:
    """Images, ``galaxy_id`` meta and truths of one split of the simulated shards."""
    data = ShardImages(shard_dirs, split)
    return SplitImages(data), data.labels.select("galaxy_id"), data.labels.select(TRUTH_COLUMNS)


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_dropout_rates`.

    Attributes
    ----------
    chosen_rate : float
        Dropout rate whose raw validation coverage is closest to nominal.
    coverage : pl.DataFrame
        Coverage table (``docs/catalog.md``): every rate raw, plus the chosen rate
        recalibrated when a recalibration was fit.
    recalibration : Recalibration or None
        Spread factors fit on validation (``profile.calibration.recalibrate``).
    n_galaxies : int
        Validation galaxies.
    """

    chosen_rate: float
    coverage: pl.DataFrame
    recalibration: Recalibration | None
    n_galaxies: int


def calibrate_dropout_rates(
    profile: Profile,
    model_dirs: Mapping[float, Path],
    shard_dirs: Sequence[Path | str],
    out_dir: Path,
    *,
    device: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> CalibrationResult:
    """Coverage of every dropout model on the validation split; choose; recalibrate (paper §5).

    Writes ``coverage.parquet`` and, when recalibrating, ``recalibration.json`` into
    ``out_dir``. Validation samples are written to ``out_dir/<dropout-key>/`` while working
    and removed at the end.
    """
    from gampen_ml.train import load_trained_model

    images, meta, truths = split_inputs(shard_dirs, "val")
    inference = profile.inference
    levels = profile.calibration.levels
    tables = []
    scalers = {}
    for rate, model_dir in model_dirs.items():
        model, scaler, _ = load_trained_model(model_dir, device)
        scalers[rate] = scaler
        catalog = catalog_from_images(
            model,
            scaler,
            images,
            meta,
            n_passes=inference.n_passes_calibration,
            seed=derive_seed(profile.seed, "calibrated_dropout_rate", dropout_key(rate)),
            store_samples=True,
            out_dir=out_dir / dropout_key(rate),
            truths=truths,
            dataset="sim-val",
            dropout_rate=rate,
            galaxies_per_batch=inference.galaxies_per_batch,
            device=device,
        )
        table = coverage_table(catalog, None, levels, dropout_rate=rate, split="val")
        tables.append(table)
        log(
            f"dropout {rate:g}: val coverage "
            + ", ".join(
                f"{r['parameter']}@{r['level']:.4f}={r['coverage']:.3f}"
                for r in table.iter_rows(named=True)
            )
        )
    chosen = select_dropout_rate(tables)
    recalibration = None
    if profile.calibration.recalibrate:
        samples = np.asarray(
            load_npy_mmap(out_dir / dropout_key(chosen) / SAMPLES_FILE), dtype=np.float32
        )
        scaler = scalers[chosen]
        truths_scaled = scaler.transform(truths.select(PARAMETERS).to_numpy().astype(np.float64))
        recalibration = fit_recalibration(samples, truths_scaled)
        summary = summarize(predict_physical(recalibration.apply(samples), scaler))
        tables.append(
            coverage_table(
                summary, truths, levels, dropout_rate=chosen, split="val", recalibrated=True
            )
        )
        (out_dir / "recalibration.json").write_text(
            json.dumps(recalibration.to_dict(), indent=2) + "\n"
        )
        log(f"recalibration scales {recalibration.scale}")
    for rate in model_dirs:
        sample_dir = out_dir / dropout_key(rate)
        (sample_dir / SAMPLES_FILE).unlink(missing_ok=True)
        sample_dir.rmdir()
    coverage = pl.concat(tables)
    coverage.write_parquet(out_dir / "coverage.parquet")
    return CalibrationResult(chosen, coverage, recalibration, len(images))


def dataset_inputs(
    profile: Profile, root: Path, shard_dirs: Sequence[Path | str], dataset: str, sim_key: str
) -> tuple[object, pl.DataFrame, pl.DataFrame | None]:
    """Images, per-galaxy meta and truths (None for real data) of one dataset partition.

    ``sim_key`` (``sim-test``) is the test split of every shard; any other key is an inbox
    batch stored at ``<root>/inbox_batches/<dataset>/`` by the inbox sensor.
    """
    if dataset == sim_key:
        return split_inputs(shard_dirs, "test")
    from gampen_ml.fits_input import load_cutouts

    batch = load_cutouts(root / "inbox_batches" / dataset, profile.imaging)
    return batch.images, batch.table, None
