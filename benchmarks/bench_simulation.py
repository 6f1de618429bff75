"""Galaxies per second per core: naive GalSim reference vs the shard renderer.

Both run in this one process on the same galaxies (Table-1 draws of the ``quick`` profile,
same PSF library):

naive
    One galaxy at a time, continuous Sérsic n, default ``GSParams``, the PSF's
    ``InterpolatedImage`` rebuilt per galaxy (``gampen_ml.sim.render.render_galaxy``).
fast
    ``gampen_ml.sim.render.FastRenderer`` on the same rows with Sérsic n quantized to
    ``SERSIC_N_STEP`` (as the shard writer does), cached PSF profiles, folding threshold
    ``FAST_FOLDING_THRESHOLD``, rendered in Sérsic-index order.

The naive path is timed on the first ``--n-naive`` galaxies, the fast path on all
``--n-fast`` (a shard-sized batch, so GalSim's per-index tables amortize as in production).
Then one ``quick`` shard (1000 galaxies) is simulated end to end with ``--workers`` processes.
Writes ``benchmarks/results/simulation.md``.

Run: ``.venv/bin/python benchmarks/bench_simulation.py``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from gampen_ml.config import derive_seed, get_profile
from gampen_ml.sim.noise import synthetic_noise_pool, write_noise_pool
from gampen_ml.sim.parameters import quantize_sersic_n, sample_parameters
from gampen_ml.sim.psf import synthetic_psf_library, write_psf_library
from gampen_ml.sim.render import (
    FAST_FOLDING_THRESHOLD,
    SERSIC_N_STEP,
    FastRenderer,
    render_galaxy,
)
from gampen_ml.sim.shards import simulate_shard
from gampen_ml.store import NOISE_POOL, PSF_LIBRARY, Store

RESULTS = Path(__file__).resolve().parent / "results" / "simulation.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-naive", type=int, default=60)
    parser.add_argument("--n-fast", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-shard", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # GalSim's large-FFT warnings of the naive path

    profile = get_profile("quick")
    imaging = profile.imaging
    cube, _ = synthetic_psf_library(profile.psf, imaging, derive_seed(profile.seed, PSF_LIBRARY))
    rng = np.random.default_rng(derive_seed(profile.seed, "bench_simulation"))
    params = sample_parameters(profile.simulation.priors, args.n_fast, rng)
    psf_id = rng.integers(0, len(cube), size=args.n_fast)
    load0 = os.getloadavg()[0]

    rows = params.head(args.n_naive).to_dicts()
    t0 = time.process_time()
    for row, i in zip(rows, psf_id, strict=False):
        render_galaxy(row, cube[i], imaging)
    naive_cpu_s = time.process_time() - t0
    naive_rate = len(rows) / naive_cpu_s

    quantized = quantize_sersic_n(params, SERSIC_N_STEP)
    t0 = time.process_time()
    FastRenderer(cube, imaging).render(quantized, psf_id)
    fast_cpu_s = time.process_time() - t0
    fast_rate = args.n_fast / fast_cpu_s
    ratio = fast_rate / naive_rate
    print(
        f"naive: {naive_rate:.2f} galaxies/s per core ({len(rows)} galaxies, {naive_cpu_s:.1f} s CPU)"
    )
    print(
        f"fast:  {fast_rate:.2f} galaxies/s per core ({args.n_fast} galaxies, {fast_cpu_s:.1f} s CPU)"
    )
    print(f"ratio: {ratio:.2f}x")

    shard_line = "not run (--skip-shard)"
    if not args.skip_shard:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(tmp)
            psf_dir, noise_dir = store.psf_library(), store.noise_pool()
            out = store.shard("shard-000")
            for d in (psf_dir, noise_dir, out):
                d.mkdir(parents=True)
            write_psf_library(psf_dir, cube, _)
            pool = synthetic_noise_pool(
                profile.noise, imaging, derive_seed(profile.seed, NOISE_POOL)
            )
            write_noise_pool(noise_dir, pool)
            summary = simulate_shard(
                profile, "shard-000", psf_dir, noise_dir, out, n_workers=args.workers
            )
        shard_line = (
            f"{summary.n_galaxies} galaxies, {summary.n_workers} workers: "
            f"{summary.wall_s:.1f} s wall ({summary.galaxies_per_s:.1f} galaxies/s)"
        )
        print(f"quick shard-000: {shard_line}")

    load1 = os.getloadavg()[0]
    cmd = "python benchmarks/bench_simulation.py " + " ".join(sys.argv[1:])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"""# Simulation speed

Command: `{cmd.strip()}`

Machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()},
load average {load0:.1f} at start and {load1:.1f} at the end (a shared machine: other
processes ran beside this one, so absolute rates are pessimistic; the ratio compares two
paths timed in one process on the same galaxies, in CPU time of this process).

| renderer | galaxies | CPU s | galaxies/s per core |
|----------|---------:|------:|--------------------:|
| naive GalSim (continuous n, default GSParams, PSF rebuilt per galaxy) | {len(rows)} | {naive_cpu_s:.1f} | {naive_rate:.2f} |
| fast (n on a {SERSIC_N_STEP} grid, cached PSFs, folding threshold {FAST_FOLDING_THRESHOLD}, index order) | {args.n_fast} | {fast_cpu_s:.1f} | {fast_rate:.2f} |

**Speed-up per core: {ratio:.2f}x.** The naive rate is measured on the first {len(rows)} of
the same {args.n_fast} galaxies.

Accuracy of the fast path (`tests/gampen_ml/sim/test_render.py`): max |fast - exact| per
pixel < 0.05 x sky sigma (2.3 nJy) over Table-1 galaxies; the quantized Sérsic indices are
what the labels record, so they are not an approximation.

Quick-profile shard (`simulate_shard`, images + noise + labels): {shard_line}.
"""
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
