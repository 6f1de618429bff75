"""Adaptive MC passes on a trained model: passes saved vs coverage, and the wall-time gain.

1. One full MC-dropout run (``--max-passes`` x K draws) on the first ``--galaxies`` test
   galaxies of the simulated shards.
2. For each tolerance, :func:`benchmarks.adaptive.stopping_samples` applies the stopping rule
   to prefixes of those same samples (rounds of ``--batch-passes``), so coverage with and
   without early stopping is compared on identical draws (no seed noise in the difference).
3. One real :func:`benchmarks.adaptive.adaptive_mc_dropout_samples` run at ``--tol`` times
   the saving end to end.

Coverage: fraction of true values inside the 68.27 / 95.45 / 99.73 % HPD intervals, per
parameter (no recalibration: the comparison is adaptive vs full, not against nominal).

Run::

    .venv/bin/python -m benchmarks.bench_adaptive [--model-dir D] [--shards-root R]
        [--galaxies 256] [--max-passes 100] [--batch-passes 20] [--tol 0.2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.adaptive import adaptive_mc_dropout_samples, stopping_samples, summarize_ragged
from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, get_profile
from gampen_ml.data.datasets import ShardImages
from gampen_ml.infer import mc_dropout_samples
from gampen_ml.posterior import coverage, level_tag
from gampen_ml.settings import Settings
from gampen_ml.store import (
    MODEL_JSON_FILE,
    SIMULATED_GALAXIES,
    STATE_DICT_FILE,
    TRAINED_MODEL,
    Store,
)
from gampen_ml.train import load_trained_model

HERE = Path(__file__).resolve().parent
TOLERANCES = (0.05, 0.1, 0.2, 0.3)


def default_model_dir() -> Path:
    """The champion dropout rate's trained model if calibrated, else the smallest rate > 0.

    Falls back to the development model in ``/tmp/exp_b``. A rate of 0 has no epistemic
    spread and is not a useful test of when MC dropout has converged.
    """
    store = Settings.resolve().store()
    try:
        rate = store.read_calibration().chosen_dropout_rate
    except FileNotFoundError:
        rate = None
    if rate and (store.trained_model(rate) / STATE_DICT_FILE).is_file():
        return store.trained_model(rate)
    rated = []
    for key in store.partition_keys(TRAINED_MODEL):
        folder = store.partition(TRAINED_MODEL, key)
        if (folder / STATE_DICT_FILE).is_file():
            rate = json.loads((folder / MODEL_JSON_FILE).read_text())["dropout_rate"]
            if rate > 0:
                rated.append((rate, folder))
    return min(rated)[1] if rated else Path("/tmp/exp_b")


def coverages(table, truth: np.ndarray) -> dict[str, np.ndarray]:
    """``{level tag: (3,) coverage of bt, re, flux}``."""
    out = {}
    for level in CREDIBLE_LEVELS:
        tag = level_tag(level)
        lo = np.stack([table[f"{p}_{tag}_lo"].to_numpy() for p in PARAMETERS], 1)
        hi = np.stack([table[f"{p}_{tag}_hi"].to_numpy() for p in PARAMETERS], 1)
        out[tag] = coverage(lo, hi, truth)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--shards-root", type=Path, default=None)
    parser.add_argument("--galaxies", type=int, default=256)
    parser.add_argument("--max-passes", type=int, default=100)
    parser.add_argument("--batch-passes", type=int, default=20)
    parser.add_argument("--tol", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "adaptive.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    model, scaler, meta = load_trained_model(model_dir)
    profile = get_profile(meta["profile"])
    k = profile.inference.draws_per_pass
    if args.shards_root is not None:
        shard_dirs = sorted(args.shards_root.glob("shard-*"))
    else:
        # The model's own storage root, else the development one.
        store = Store(model_dir.parent.parent)
        if not store.partition_keys(SIMULATED_GALAXIES):
            store = Store(Path("/tmp/quick_root"))
        shard_dirs = [store.shard(key) for key in store.partition_keys(SIMULATED_GALAXIES)]
    test = ShardImages(shard_dirs, "test")
    n = min(args.galaxies, len(test))
    index = np.arange(n)
    images, truth = test.images(index), test.physical_labels()[:n]
    kw = dict(seed=11, galaxies_per_batch=profile.inference.galaxies_per_batch, draws_per_pass=k)

    for _ in mc_dropout_samples(model, images[:1], 2, **kw):  # warm-up
        pass
    t0 = time.perf_counter()
    full = np.concatenate([s for _, s in mc_dropout_samples(model, images, args.max_passes, **kw)])
    full_s = time.perf_counter() - t0
    t_max = full.shape[1]
    batch_samples = args.batch_passes * k

    rows = []
    full_cov = coverages(summarize_ragged(full, np.full(n, t_max), scaler.inverse), truth)
    rows.append(("full", float(args.max_passes), full_cov))
    for tol in TOLERANCES:
        used = stopping_samples(full, batch_samples, rel_tol=tol)
        cov = coverages(summarize_ragged(full, used, scaler.inverse), truth)
        rows.append((f"adaptive tol {tol:g}", used.mean() / k, cov))

    t0 = time.perf_counter()
    chunks = list(
        adaptive_mc_dropout_samples(
            model,
            images,
            args.max_passes,
            batch_passes=args.batch_passes,
            rel_tol=args.tol,
            **kw,
        )
    )
    adaptive_s = time.perf_counter() - t0
    used_live = np.concatenate([c.n_samples for c in chunks]) / k

    se95 = np.sqrt(0.9545 * 0.0455 / n)
    lines = [
        "# Adaptive number of MC-dropout passes",
        "",
        "Command:",
        "",
        f"    .venv/bin/python -m benchmarks.bench_adaptive --galaxies {args.galaxies} "
        f"--max-passes {args.max_passes} --batch-passes {args.batch_passes} --tol {args.tol} "
        f"--threads {args.threads}",
        "",
        f"Model `{model_dir}` (profile {profile.name}, dropout {meta['dropout_rate']}, "
        f"{meta.get('epochs_trained')} epochs); the first {n} galaxies of the test split; "
        f"{args.max_passes} passes x K = {k} draws = {t_max} samples at most; rounds of "
        f"{args.batch_passes} passes; stop when the 95.45 % HPD bounds of all three parameters "
        "moved by < tol x posterior std since the previous round. CPU, "
        f"{args.threads} torch threads. Coverage = fraction of true values inside the HPD "
        f"interval (bt, re, flux); binomial standard error at 95 %: {se95:.3f}.",
        "",
        "| rule | mean passes | saved | "
        + " | ".join(f"{level_tag(lv)} bt / re / flux" for lv in CREDIBLE_LEVELS)
        + " |",
        "|---|---|---|" + "---|" * len(CREDIBLE_LEVELS),
    ]
    for name, passes, cov in rows:
        cells = [" / ".join(f"{v:.3f}" for v in cov[level_tag(lv)]) for lv in CREDIBLE_LEVELS]
        saved = 1 - passes / args.max_passes
        lines.append(f"| {name} | {passes:.1f} | {saved:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Live run (`adaptive_mc_dropout_samples`, tol {args.tol}): mean {used_live.mean():.1f} "
        f"passes per galaxy, {adaptive_s:.1f} s vs {full_s:.1f} s for the full run "
        f"(**{full_s / adaptive_s:.2f}x** faster; the stopping check itself is included).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
