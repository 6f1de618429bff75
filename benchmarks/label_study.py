"""The labeller against truth: profile-fit labels of the simulated target domain.

Renders ``--n`` galaxies of the target domain (``gampen_ml.sim.target_domain``: Table-1
galaxies with star-forming knots, a Kolmogorov PSF and correlated noise; the frozen test
seed by default, i.e. the transfer study's test galaxies), labels them with ``gampen_ml.label``
exactly as ``gampen label`` does, and compares the labels with the truths:

* the labeller's error distribution per parameter -- bias (mean residual), sigma (standard
  deviation), 68th percentile of |residual| -- for ``bt`` (absolute), ``re_arcsec`` and
  ``flux_nJy`` (absolute and fractional, residual / truth);
* the coverage of its posterior widths: the fraction of galaxies whose truth lies within
  ``k * sigma`` of the label, ``k = 1, 2, 3`` for the 68.27 / 95.45 / 99.73 % levels (the
  Laplace posterior is Gaussian in the fit's own parameters, so these are approximate for
  ``bt`` near 0 or 1);
* seconds per galaxy (median and mean of ``fit_seconds``; the first fit of each crop size in
  a process also compiles it).

Resumable: the cutouts and the labels live in ``--work`` and a rerun fits only the galaxies
not yet labelled (``label_folder(..., resume=True)``); ``--workers`` processes fit in parallel.
Writes ``label_study.json`` and ``label_study.md`` to ``--out`` and the per-galaxy table
(truth, label, residuals) to ``<work>/label_study.parquet``, from which the transfer study
can draw label errors.

Run::

    .venv/bin/python -m benchmarks.label_study --n 20 --workers 1
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.study_files import mark_rendered, rendered, write_results
from gampen_ml.config import get_profile
from gampen_ml.label import STATUS_OK, label_folder, read_labels
from gampen_ml.sim.target_domain import (
    FROZEN_TEST_SEED,
    TRUTH_FILE,
    TargetDomainConfig,
    write_target_domain,
)

HERE = Path(__file__).resolve().parent
#: Parameters scored, and whether a fractional residual is also reported.
PARAMETERS = {"bt": False, "re_arcsec": True, "flux_nJy": True}
SIGMA_COLUMNS = {"bt": "bt_sigma", "re_arcsec": "re_sigma", "flux_nJy": "flux_sigma"}
#: Credible levels and the half-widths (in posterior sigmas) of their Gaussian intervals.
LEVELS = {0.6827: 1.0, 0.9545: 2.0, 0.9973: 3.0}
STUDY_FILE = "study.json"


def render(work: Path, n: int, seed: int, n_workers: int) -> pl.DataFrame:
    """The study's cutouts and truth table in ``work/cutouts`` (rendered once per n, seed)."""
    cutouts = work / "cutouts"
    marker = work / STUDY_FILE
    if rendered(marker, n, seed, "pass another --work"):
        return pl.read_parquet(cutouts / TRUTH_FILE)
    truth = write_target_domain(cutouts, n, TargetDomainConfig(), seed, n_workers=n_workers)
    mark_rendered(marker, n, seed)
    return truth


def score(table: pl.DataFrame) -> dict:
    """Error distribution and coverage of the labels in ``table`` (truth + label columns)."""
    out: dict = {}
    for p, fractional in PARAMETERS.items():
        rows = table.filter(pl.col(p).is_not_null() & pl.col(f"{p}_true").is_not_null())
        label = rows[p].to_numpy()
        true = rows[f"{p}_true"].to_numpy()
        sigma = rows[SIGMA_COLUMNS[p]].fill_null(np.nan).to_numpy()
        res = label - true
        entry = {"n": int(rows.height)}
        variants = {"": res}
        if fractional:
            variants["frac_"] = res / true
        for prefix, r in variants.items():
            entry[f"{prefix}bias"] = float(np.mean(r)) if r.size else math.nan
            entry[f"{prefix}sigma"] = float(np.std(r, ddof=1)) if r.size > 1 else math.nan
            entry[f"{prefix}p68_abs"] = float(np.percentile(np.abs(r), 68)) if r.size else math.nan
        with_sigma = np.isfinite(sigma) & (sigma > 0)
        entry["n_with_sigma"] = int(with_sigma.sum())
        entry["median_sigma"] = float(np.median(sigma[with_sigma])) if with_sigma.any() else None
        for level, k in LEVELS.items():
            inside = np.abs(res[with_sigma]) <= k * sigma[with_sigma]
            entry[f"coverage_{int(100 * level)}"] = (
                float(inside.mean()) if with_sigma.any() else math.nan
            )
        out[p] = entry
    return out


def markdown(result: dict) -> str:
    """The result as the markdown section of ``benchmarks/results/label_study.md``."""
    s = result["seconds_per_galaxy"]
    wall = (
        f"wall time {result['wall_seconds']:.0f} s for the {result['n_fitted_this_run']} fits "
        "of the last run"
        if result["n_fitted_this_run"]
        else "every label from earlier runs"
    )
    lines = [
        "# Labeller vs truth",
        "",
        f"Command: `python -m benchmarks.label_study --n {result['n_galaxies']} --workers "
        f"{result['workers']} --model {result['model']}`",
        "",
        f"{result['n_galaxies']} galaxies of the simulated target domain "
        f"(`{result['domain']}`: knots, Kolmogorov PSF, correlated noise; seed "
        f"{result['seed']}), labelled with `gampen label --model {result['model']}` "
        f"({result['n_ok']} fits `ok`; statuses {result['statuses']}), "
        f"{result['workers']} worker(s) on {result['machine']}.",
        "",
        "| parameter | n | bias | σ | p68 \\|res\\| | frac. bias | frac. σ | frac. p68 | "
        "median posterior σ | cov. 68.27 % | cov. 95.45 % | cov. 99.73 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(value, fmt: str = ".3g") -> str:
        return "–" if value is None or not np.isfinite(value) else format(value, fmt)

    for p, e in result["parameters"].items():
        lines.append(
            f"| `{p}` | {e['n']} | {f(e['bias'])} | {f(e['sigma'])} | {f(e['p68_abs'])} | "
            f"{f(e.get('frac_bias'), '+.3f')} | {f(e.get('frac_sigma'), '.3f')} | "
            f"{f(e.get('frac_p68_abs'), '.3f')} | {f(e['median_sigma'])} | "
            f"{f(e['coverage_68'], '.2f')} | {f(e['coverage_95'], '.2f')} | "
            f"{f(e['coverage_99'], '.2f')} |"
        )
    lines += [
        "",
        f"Seconds per galaxy: median {s['median']:.1f}, mean {s['mean']:.1f}, max {s['max']:.1f} "
        f"(the first fit of each crop size in a process compiles it); {wall}.",
        "",
        "bias, σ and p68 are in the parameter's unit (B/T, arcsec, nJy); the fractional ones "
        "are residual / truth. Coverage: the truth within 1, 2, 3 posterior σ of the label "
        "(Gaussian intervals of the Laplace posterior).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="galaxies (default 20)")
    parser.add_argument("--seed", type=int, default=FROZEN_TEST_SEED)
    parser.add_argument("--workers", type=int, default=1, help="fit processes (default 1)")
    parser.add_argument("--model", default="bulge-disk", choices=("bulge-disk", "sersic"))
    parser.add_argument(
        "--work", type=Path, default=HERE / "out" / "label_study", help="cutouts and labels"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="JSON + markdown")
    args = parser.parse_args()

    from tqdm import tqdm

    args.work.mkdir(parents=True, exist_ok=True)
    truth = render(args.work, args.n, args.seed, args.workers)
    labels_file = args.work / f"labels_{args.model}.parquet"
    bar = tqdm(desc="label", unit="gal", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    cfg = TargetDomainConfig()
    start = time.perf_counter()
    run = label_folder(
        args.work / "cutouts",
        labels_file,
        cfg.domain().imaging(get_profile("quick").imaging),
        domain=cfg.domain(),
        model=args.model,
        resume=True,
        n_workers=args.workers,
        progress=progress,
    )
    bar.close()
    wall = time.perf_counter() - start
    labels = read_labels(labels_file)
    table = labels.join(
        truth.select(
            "file", "hdu", "component", *(pl.col(p).alias(f"{p}_true") for p in PARAMETERS)
        ),
        on=["file", "hdu"],
        how="left",
    )
    if args.model == "sersic":
        table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias("bt_true"))
    table = table.with_columns(
        (pl.col(p) - pl.col(f"{p}_true")).alias(f"{p}_residual") for p in PARAMETERS
    )
    table.write_parquet(args.work / "label_study.parquet")
    seconds = labels.filter(pl.col("fit_seconds").is_not_null())["fit_seconds"].to_numpy()
    statuses = {
        (s.split(":")[0]): int(c)
        for s, c in labels.group_by("fit_status").len().sort("fit_status").iter_rows()
    }
    result = {
        "benchmark": "label_study",
        "domain": cfg.name,
        "seed": args.seed,
        "model": args.model,
        "n_galaxies": labels.height,
        "n_ok": int((labels["fit_status"] == STATUS_OK).sum()),
        "statuses": statuses,
        "workers": args.workers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "n_fitted_this_run": run.n_files,
        "wall_seconds": wall,
        "seconds_per_galaxy": {
            "median": float(np.median(seconds)),
            "mean": float(np.mean(seconds)),
            "max": float(np.max(seconds)),
        },
        "parameters": score(table),
    }
    write_results(args.out, "label_study", result, markdown(result))


if __name__ == "__main__":
    main()
