"""Qualitative flags from the posterior catalog (paper §6.4 and §7).

Where GaMPEN's residuals are largest, the paper replaces numbers by labels assigned from
the *predicted* values (truths are unknown for real galaxies): highly bulge-dominated
(B/T mode >= 0.85), highly disk-dominated (B/T mode <= 0.10) and small (Re mode < 1").
We add an ``unreliable`` flag for posteriors wider than configurable limits. Precision of
the labels against the truths (simulations only): paper >= 99 % for B/T, ~97 % for Re.
"""

from __future__ import annotations

import polars as pl

from gampen_ml.config import FlagConfig

FLAG_COLUMNS = ("bulge_dominated", "disk_dominated", "small", "unreliable")

FLAGS_SCHEMA: dict[str, pl.DataType] = {
    "galaxy_id": pl.Int64(),
    "dataset": pl.String(),
    **{name: pl.Boolean() for name in FLAG_COLUMNS},
}


class FlagError(ValueError):
    """The catalog lacks a column the flags need; the message names it."""


def _require(catalog: pl.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in catalog.columns]
    if missing:
        raise FlagError(f"{where}: catalog lacks column(s) {missing}")


def compute_flags(catalog: pl.DataFrame, cfg: FlagConfig) -> pl.DataFrame:
    """Qualitative flags per galaxy.

    Parameters
    ----------
    catalog : pl.DataFrame
        Posterior catalog (``docs/catalog.md``): needs ``galaxy_id``, ``dataset``,
        ``bt_mode``, ``re_arcsec_mode``, ``flux_nJy_mode`` and the 68.27 % HPD bounds.
    cfg : FlagConfig
        Thresholds.

    Returns
    -------
    pl.DataFrame
        :data:`FLAGS_SCHEMA`: ``bulge_dominated`` (``bt_mode >= bulge_dominated_min_bt``),
        ``disk_dominated`` (``bt_mode <= disk_dominated_max_bt``), ``small``
        (``re_arcsec_mode < small_max_re_arcsec``), ``unreliable`` (68.27 % HPD width of
        B/T above ``max_bt_width``, or of Re / flux relative to the mode above
        ``max_re_fractional_width`` / ``max_flux_fractional_width``).
    """
    needed = ["galaxy_id", "dataset", "bt_mode", "re_arcsec_mode", "flux_nJy_mode"] + [
        f"{p}_hpd68_{side}" for p in ("bt", "re_arcsec", "flux_nJy") for side in ("lo", "hi")
    ]
    _require(catalog, needed, "compute_flags")

    def width(p: str) -> pl.Expr:
        return pl.col(f"{p}_hpd68_hi") - pl.col(f"{p}_hpd68_lo")

    return catalog.select(
        pl.col("galaxy_id").cast(pl.Int64),
        pl.col("dataset").cast(pl.String),
        (pl.col("bt_mode") >= cfg.bulge_dominated_min_bt).alias("bulge_dominated"),
        (pl.col("bt_mode") <= cfg.disk_dominated_max_bt).alias("disk_dominated"),
        (pl.col("re_arcsec_mode") < cfg.small_max_re_arcsec).alias("small"),
        (
            (width("bt") > cfg.max_bt_width)
            | (width("re_arcsec") > cfg.max_re_fractional_width * pl.col("re_arcsec_mode"))
            | (width("flux_nJy") > cfg.max_flux_fractional_width * pl.col("flux_nJy_mode"))
        ).alias("unreliable"),
    )


def flag_precision(
    catalog: pl.DataFrame, flags: pl.DataFrame, cfg: FlagConfig | None = None
) -> dict[str, float | int]:
    """Fraction of flagged galaxies whose TRUE value satisfies the flag's criterion.

    Parameters
    ----------
    catalog : pl.DataFrame
        Catalog with ``galaxy_id``, ``bt_true`` and ``re_arcsec_true`` (simulations).
    flags : pl.DataFrame
        :func:`compute_flags` output for the same catalog.
    cfg : FlagConfig, optional
        The thresholds used for the flags (default: ``FlagConfig()``).

    Returns
    -------
    dict
        ``{flag: precision}`` for ``bulge_dominated``, ``disk_dominated`` and ``small``
        (NaN when nothing is flagged) and ``n_{flag}`` counts of flagged galaxies.
    """
    cfg = cfg or FlagConfig()
    _require(catalog, ["galaxy_id", "bt_true", "re_arcsec_true"], "flag_precision")
    joined = flags.join(
        catalog.select("galaxy_id", "bt_true", "re_arcsec_true"), on="galaxy_id", how="left"
    )
    if len(joined) != len(flags) or joined["bt_true"].null_count():
        raise FlagError("flag_precision: flags and catalog galaxy_ids disagree or truths are null")
    criteria = {
        "bulge_dominated": pl.col("bt_true") >= cfg.bulge_dominated_min_bt,
        "disk_dominated": pl.col("bt_true") <= cfg.disk_dominated_max_bt,
        "small": pl.col("re_arcsec_true") < cfg.small_max_re_arcsec,
    }
    result: dict[str, float | int] = {}
    for name, truth_ok in criteria.items():
        flagged = joined.filter(pl.col(name))
        n = len(flagged)
        result[name] = float(flagged.select(truth_ok.mean()).item()) if n else float("nan")
        result[f"n_{name}"] = n
    return result
