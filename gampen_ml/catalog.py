"""The posterior catalog: schema, assembly, Parquet I/O and streaming construction.

:data:`CATALOG_SCHEMA` is the one definition of the catalog columns (documented in
``docs/catalog.md``). :func:`catalog_from_images` ties the stages together chunk by chunk:
MC-dropout samples (scaled space) -> optional recalibration -> inverse label transform ->
per-galaxy summary, keeping memory flat in the number of galaxies and optionally writing
the raw samples as a float16 ``samples.npy`` memory map. The samples are stored in the
network's scaled label space (after recalibration): fluxes in nJy overflow float16, while
scaled values are O(1); ``LabelScaler.inverse`` maps them back to physical units.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

import gampen_ml
from gampen_ml.calibrate import Recalibration
from gampen_ml.config import AB_ZEROPOINT_NJY, CREDIBLE_LEVELS, PARAMETERS, FlagConfig
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.flags import (
    IMAGE_STATISTICS,
    bt_class_probabilities,
    image_asymmetry,
    image_statistics,
)
from gampen_ml.infer import mc_dropout_samples, predict_physical
from gampen_ml.io import StorageError, atomic_file
from gampen_ml.posterior import level_tag, summarize

CATALOG_FILE = "catalog.parquet"
SAMPLES_FILE = "samples.npy"


def _catalog_schema() -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {
        "galaxy_id": pl.Int64(),
        "dataset": pl.String(),
        "source_file": pl.String(),
        "hdu": pl.Int32(),
        "ra_deg": pl.Float64(),
        "dec_deg": pl.Float64(),
    }
    for p in PARAMETERS:
        for stat in ("mode", "mean", "median", "std"):
            schema[f"{p}_{stat}"] = pl.Float64()
        for level in CREDIBLE_LEVELS:
            tag = level_tag(level)
            schema[f"{p}_{tag}_lo"] = pl.Float64()
            schema[f"{p}_{tag}_hi"] = pl.Float64()
        schema[f"{p}_true"] = pl.Float64()
    schema.update(
        {
            "component_true": pl.String(),
            "magnitude_mode": pl.Float64(),
            "bt_prob_bulge": pl.Float64(),
            "bt_prob_disk": pl.Float64(),
            "asymmetry": pl.Float64(),
            **{name: pl.Float64() for name in IMAGE_STATISTICS},
            "psf_fwhm_arcsec": pl.Float64(),
            "model_name": pl.String(),
            "model_version": pl.String(),
            "dropout_rate": pl.Float64(),
            "n_passes": pl.Int32(),
            "recalibrated": pl.Boolean(),
            "code_version": pl.String(),
        }
    )
    return schema


#: Per-galaxy columns computed beside the summary (null in catalogs that predate them).
SAMPLE_STATISTICS = ("bt_prob_bulge", "bt_prob_disk", "asymmetry", *IMAGE_STATISTICS)
#: Column name -> polars dtype, in catalog order (see ``docs/catalog.md``).
CATALOG_SCHEMA: dict[str, pl.DataType] = _catalog_schema()
#: Columns that may hold nulls (real cutouts have no truth; simulations no FITS origin).
NULLABLE_COLUMNS: frozenset[str] = frozenset(
    {"source_file", "hdu", "ra_deg", "dec_deg", "component_true", "psf_fwhm_arcsec"}
    | {f"{p}_true" for p in PARAMETERS}
    | set(SAMPLE_STATISTICS)
)
#: Nullable columns added after the first catalog format; a stored catalog that predates one
#: reads with it all null instead of failing.
LATER_COLUMNS: tuple[str, ...] = (
    "asymmetry",
    "psf_fwhm_arcsec",
    "bt_prob_bulge",
    "bt_prob_disk",
    *IMAGE_STATISTICS,
)
#: Optional per-galaxy metadata columns taken from ``meta`` when present.
META_COLUMNS = ("source_file", "hdu", "ra_deg", "dec_deg", "psf_fwhm_arcsec")


class CatalogSchemaError(ValueError):
    """A catalog lacks a column, has a wrong dtype, or unexpected nulls; the message says which."""


@functools.cache
def code_version() -> str:
    """``gampen_ml.__version__``, plus ``+g<commit>`` when the source is a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(gampen_ml.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{gampen_ml.__version__}+g{commit}" if commit else gampen_ml.__version__


def magnitude_ab(flux_nJy: np.ndarray) -> np.ndarray:
    """AB magnitude of fluxes in nJy: ``m = 31.4 - 2.5 log10(F / nJy)``."""
    return AB_ZEROPOINT_NJY - 2.5 * np.log10(np.asarray(flux_nJy, dtype=np.float64))


def validate_catalog(df: pl.DataFrame, source: str = "catalog") -> pl.DataFrame:
    """Check ``df`` against :data:`CATALOG_SCHEMA`; return it in schema column order.

    Columns of :data:`LATER_COLUMNS` that ``df`` lacks (a catalog written before they
    existed) are added as nulls.

    Raises
    ------
    CatalogSchemaError
        Naming ``source`` and the first missing column, wrong dtype, or non-nullable
        column holding nulls.
    """
    missing_later = [c for c in LATER_COLUMNS if c not in df.columns]
    if missing_later:
        df = df.with_columns(pl.lit(None, CATALOG_SCHEMA[c]).alias(c) for c in missing_later)
    for name, dtype in CATALOG_SCHEMA.items():
        if name not in df.columns:
            raise CatalogSchemaError(f"{source}: missing column {name!r} ({dtype})")
        if df.schema[name] != dtype:
            raise CatalogSchemaError(
                f"{source}: column {name!r} has dtype {df.schema[name]}, expected {dtype}"
            )
        if name not in NULLABLE_COLUMNS and df[name].null_count():
            raise CatalogSchemaError(
                f"{source}: column {name!r} has {df[name].null_count()} null value(s)"
            )
    return df.select(list(CATALOG_SCHEMA))


def build_catalog(
    summary: pl.DataFrame,
    meta: pl.DataFrame,
    truths: pl.DataFrame | None,
    *,
    model_name: str,
    model_version: str,
    dropout_rate: float,
    n_passes: int,
    recalibrated: bool,
    dataset: str,
) -> pl.DataFrame:
    """Assemble a schema-conforming catalog from a posterior summary and per-galaxy metadata.

    Parameters
    ----------
    summary : pl.DataFrame
        :func:`gampen_ml.posterior.summarize` output, ``N`` rows.
    meta : pl.DataFrame
        ``N`` rows with ``galaxy_id`` and optionally ``source_file``, ``hdu``, ``ra_deg``,
        ``dec_deg``, ``psf_fwhm_arcsec`` (missing ones become null).
    truths : pl.DataFrame or None
        ``N`` rows with ``bt``, ``re_arcsec``, ``flux_nJy`` and optionally ``component``
        (e.g. the simulation labels); ``None`` for real cutouts.
    model_name, model_version, dropout_rate, n_passes, recalibrated, dataset
        Provenance copied into every row.

    Returns
    -------
    pl.DataFrame
        Columns and dtypes of :data:`CATALOG_SCHEMA`.
    """
    n = len(summary)
    if "galaxy_id" not in meta.columns:
        raise CatalogSchemaError("build_catalog: meta lacks column 'galaxy_id'")
    if len(meta) != n or (truths is not None and len(truths) != n):
        raise CatalogSchemaError(
            f"build_catalog: summary has {n} rows, meta {len(meta)}, "
            f"truths {None if truths is None else len(truths)}"
        )
    columns: dict[str, pl.Series | object] = {
        "galaxy_id": meta["galaxy_id"],
        "dataset": pl.repeat(dataset, n, eager=True),
    }
    for name in META_COLUMNS:
        columns[name] = meta[name] if name in meta.columns else pl.repeat(None, n, eager=True)
    for name in CATALOG_SCHEMA:
        if name in summary.columns:
            columns[name] = summary[name]
    for p in PARAMETERS:
        if truths is None:
            columns[f"{p}_true"] = pl.repeat(None, n, eager=True)
        elif p not in truths.columns:
            raise CatalogSchemaError(f"build_catalog: truths lack column {p!r}")
        else:
            columns[f"{p}_true"] = truths[p]
    has_component = truths is not None and "component" in truths.columns
    columns["component_true"] = (
        truths["component"] if has_component else pl.repeat(None, n, eager=True)
    )
    if "flux_nJy_mode" not in summary.columns:
        raise CatalogSchemaError("build_catalog: summary lacks column 'flux_nJy_mode'")
    columns["magnitude_mode"] = magnitude_ab(summary["flux_nJy_mode"].to_numpy())
    for name in SAMPLE_STATISTICS:
        if name not in summary.columns:
            columns[name] = pl.repeat(None, n, eager=True)
    columns.update(
        {
            "model_name": pl.repeat(model_name, n, eager=True),
            "model_version": pl.repeat(str(model_version), n, eager=True),
            "dropout_rate": pl.repeat(float(dropout_rate), n, eager=True),
            "n_passes": pl.repeat(int(n_passes), n, eager=True),
            "recalibrated": pl.repeat(bool(recalibrated), n, eager=True),
            "code_version": pl.repeat(code_version(), n, eager=True),
        }
    )
    missing = [c for c in CATALOG_SCHEMA if c not in columns]
    if missing:
        raise CatalogSchemaError(f"build_catalog: summary lacks column(s) {missing}")
    df = pl.DataFrame(
        {name: pl.Series(name, columns[name]).cast(dtype) for name, dtype in CATALOG_SCHEMA.items()}
    )
    return validate_catalog(df, source="build_catalog")


def write_catalog(directory: Path | str, df: pl.DataFrame) -> Path:
    """Validate and write ``<directory>/catalog.parquet`` atomically; return its path."""
    df = validate_catalog(df, source=f"write_catalog({directory})")
    path = Path(directory) / CATALOG_FILE
    with atomic_file(path) as tmp:
        df.write_parquet(tmp)
    return path


def read_catalog(directory: Path | str) -> pl.DataFrame:
    """Read and validate ``<directory>/catalog.parquet``."""
    path = Path(directory) / CATALOG_FILE
    if not path.is_file():
        raise StorageError(f"missing catalog file {path}")
    return validate_catalog(pl.read_parquet(path), source=str(path))


def _model_dropout_rate(model: torch.nn.Module) -> float:
    rate = getattr(model, "dropout_rate", None)
    if rate is not None:
        return float(rate)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            return float(module.p)
    return 0.0


def catalog_from_images(
    model: torch.nn.Module,
    scaler: LabelScaler,
    images: np.ndarray,
    meta: pl.DataFrame,
    *,
    n_passes: int,
    seed: int,
    recalibration: Recalibration | None = None,
    store_samples: bool = False,
    out_dir: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    truths: pl.DataFrame | None = None,
    dataset: str = "unnamed",
    model_name: str = "gampen",
    model_version: str = "unregistered",
    dropout_rate: float | None = None,
    galaxies_per_batch: int = 32,
    device: str | torch.device | None = None,
    draws_per_pass: int = 1,
    flags: FlagConfig | None = None,
) -> pl.DataFrame:
    """Stream images through MC dropout into a posterior catalog.

    Per chunk of ``galaxies_per_batch`` galaxies: :func:`gampen_ml.infer.mc_dropout_samples`
    (scaled space) -> ``recalibration.apply`` -> :meth:`LabelScaler.inverse` ->
    :func:`gampen_ml.posterior.summarize`. Only the per-galaxy summary rows accumulate.

    Parameters
    ----------
    model, scaler
        Trained network and the label scaler saved with it.
    images : (N, S, S) array_like
        Raw images (nJy/pixel), e.g. a memory-mapped shard.
    meta : pl.DataFrame
        ``N`` rows with ``galaxy_id`` (and optionally FITS origin / WCS columns).
    n_passes, seed
        MC passes per galaxy and base seed.
    recalibration : Recalibration, optional
        Spread recalibration fit on validation; sets ``recalibrated`` in the catalog.
    store_samples : bool
        Write the samples to ``<out_dir>/samples.npy``, ``(N, T, 3)`` float16 in the
        network's scaled space (after recalibration); ``scaler.inverse`` gives physical units.
    out_dir : path, optional
        Folder for ``samples.npy`` (required when ``store_samples``).
    progress : callable(done, total), optional
        Called after each chunk with the number of galaxies done.
    truths : pl.DataFrame, optional
        True labels for simulations (see :func:`build_catalog`).
    dataset, model_name, model_version, dropout_rate
        Provenance; ``dropout_rate`` defaults to the model's.
    galaxies_per_batch, device, draws_per_pass
        Passed to :func:`gampen_ml.infer.mc_dropout_samples`.
    flags : FlagConfig, optional
        B/T class thresholds of ``bt_prob_bulge`` / ``bt_prob_disk``
        (:func:`gampen_ml.flags.bt_class_probabilities`); default ``FlagConfig()``.

    Returns
    -------
    pl.DataFrame
        The catalog (:data:`CATALOG_SCHEMA`).
    """
    n_galaxies = len(images)
    if len(meta) != n_galaxies:
        raise CatalogSchemaError(
            f"catalog_from_images: meta has {len(meta)} rows for {n_galaxies} images"
        )
    sample_store = None
    if store_samples:
        if out_dir is None:
            raise CatalogSchemaError("catalog_from_images: store_samples needs out_dir")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        sample_store = np.lib.format.open_memmap(
            Path(out_dir) / SAMPLES_FILE,
            mode="w+",
            dtype=np.float16,
            shape=(n_galaxies, n_passes * draws_per_pass, len(PARAMETERS)),
        )
    parts = []
    for start, scaled in mc_dropout_samples(
        model,
        images,
        n_passes,
        seed=seed,
        device=device,
        galaxies_per_batch=galaxies_per_batch,
        draws_per_pass=draws_per_pass,
    ):
        if recalibration is not None:
            scaled = recalibration.apply(scaled)
        physical = predict_physical(scaled, scaler)
        if sample_store is not None:
            sample_store[start : start + len(scaled)] = scaled.astype(np.float16)
        # Image statistics beside the posterior: the training galaxies are point-symmetric,
        # detected, within the prior's fluxes and under the pool's noise, so these mark a
        # galaxy outside the training distribution (flags.py).
        chunk = np.asarray(images[start : start + len(physical)])
        parts.append(
            pl.concat(
                [
                    summarize(physical),
                    bt_class_probabilities(physical[:, :, 0], flags),
                    pl.DataFrame({"asymmetry": image_asymmetry(chunk)}),
                    image_statistics(chunk),
                ],
                how="horizontal",
            )
        )
        if progress is not None:
            progress(start + len(physical), n_galaxies)
    if sample_store is not None:
        sample_store.flush()
        del sample_store
    summary = pl.concat(parts) if parts else summarize(np.zeros((0, 2, 3)))
    return build_catalog(
        summary,
        meta,
        truths,
        model_name=model_name,
        model_version=model_version,
        dropout_rate=_model_dropout_rate(model) if dropout_rate is None else dropout_rate,
        n_passes=n_passes,
        recalibrated=recalibration is not None,
        dataset=dataset,
    )
