"""Posterior summaries: vectorized ``gampen_ml.posterior`` vs a per-galaxy KDE reference.

The reference imitates the original GaMPEN code: for every galaxy and parameter a
``scipy.stats.gaussian_kde`` evaluated on a grid, the mode at the grid argmax, and the
"1/2/3 sigma" intervals grown outward from the mode in equal grid steps until they enclose
the level. Both run in this one process on the same synthetic posteriors (gamma draws with
a known mode and known HPD intervals), so speed and accuracy are compared like for like.

Run::

    .venv/bin/python benchmarks/bench_posterior.py [--galaxies 3000] [--reference 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import optimize, stats

from gampen_ml.config import CREDIBLE_LEVELS
from gampen_ml.posterior import summarize

SHAPES = (3.0, 4.0, 6.0)  # gamma shapes of the three "parameters"


def reference_one(x: np.ndarray, levels=CREDIBLE_LEVELS, n_grid: int = 1000):
    """Original-style mode and intervals of one galaxy-parameter."""
    kde = stats.gaussian_kde(x)
    grid = np.linspace(x.min(), x.max(), n_grid)
    prob = kde(grid)
    prob /= prob.sum()
    peak = int(np.argmax(prob))
    bounds = []
    for level in levels:
        lo = hi = peak
        while prob[lo : hi + 1].sum() < level and (lo > 0 or hi < n_grid - 1):
            lo, hi = max(lo - 1, 0), min(hi + 1, n_grid - 1)
        bounds.append((grid[lo], grid[hi]))
    return grid[peak], bounds


def analytic(shape: float, level: float) -> tuple[float, float]:
    dist = stats.gamma(shape)
    res = optimize.minimize_scalar(
        lambda a: dist.ppf(a + level) - dist.ppf(a), bounds=(0, 1 - level), method="bounded"
    )
    return dist.ppf(res.x), dist.ppf(res.x + level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galaxies", type=int, default=3000)
    parser.add_argument("--reference", type=int, default=30)
    parser.add_argument("--passes", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    samples = np.stack(
        [rng.gamma(k, 1.0, size=(args.galaxies, args.passes)) for k in SHAPES], axis=-1
    )

    t0 = time.perf_counter()
    df = summarize(samples)
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = [
        [reference_one(samples[g, :, j]) for j in range(len(SHAPES))] for g in range(args.reference)
    ]
    ref_s = time.perf_counter() - t0

    ours_rate = args.galaxies / ours_s
    ref_rate = args.reference / ref_s
    print(
        f"galaxies x passes x params: ours {args.galaxies} x {args.passes} x 3, "
        f"reference {args.reference} x {args.passes} x 3"
    )
    print(f"ours      {ours_s:8.3f} s  {ours_rate:10.1f} galaxies/s")
    print(f"reference {ref_s:8.3f} s  {ref_rate:10.1f} galaxies/s")
    print(f"speed-up  {ours_rate / ref_rate:8.1f} x")

    n = args.reference
    print("\nmean |error| vs analytic (same first galaxies), in units of the true std:")
    print("param  level   ours_lo  ours_hi   ref_lo   ref_hi | mode: ours    ref")
    for j, (name, k) in enumerate(zip(("bt", "re_arcsec", "flux_nJy"), SHAPES, strict=True)):
        sd = np.sqrt(k)
        mode_true = k - 1.0
        ours_mode = np.abs(df[f"{name}_mode"].to_numpy()[:n] - mode_true).mean() / sd
        ref_mode = np.mean([abs(ref[g][j][0] - mode_true) for g in range(n)]) / sd
        for i, (level, tag) in enumerate(
            zip(CREDIBLE_LEVELS, ("hpd68", "hpd95", "hpd99"), strict=True)
        ):
            a, b = analytic(k, level)
            o_lo = np.abs(df[f"{name}_{tag}_lo"].to_numpy()[:n] - a).mean() / sd
            o_hi = np.abs(df[f"{name}_{tag}_hi"].to_numpy()[:n] - b).mean() / sd
            r_lo = np.mean([abs(ref[g][j][1][i][0] - a) for g in range(n)]) / sd
            r_hi = np.mean([abs(ref[g][j][1][i][1] - b) for g in range(n)]) / sd
            tail = f" | {ours_mode:10.3f} {ref_mode:6.3f}" if i == 0 else ""
            print(f"{name:9s} {level:.4f} {o_lo:8.3f} {o_hi:8.3f} {r_lo:8.3f} {r_hi:8.3f}{tail}")


if __name__ == "__main__":
    main()
