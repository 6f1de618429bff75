"""Adaptive number of Monte-Carlo-dropout passes: stop a galaxy once its HPD has converged.

A survey catalog spends almost all of its compute in the ``T`` stochastic-tail passes per
galaxy (paper: ``T = 1000``). Many posteriors are well determined long before that. Here
passes are drawn in rounds of ``batch_passes``; after each round (from the second on) the
``level`` HPD interval of every parameter is recomputed from all samples so far, and a
galaxy stops when neither bound of any parameter moved by more than ``rel_tol`` times that
parameter's posterior standard deviation since the previous round. Galaxies still moving
go on, up to ``max_passes``.

:func:`stopping_samples` is the criterion alone (applied to samples already drawn, e.g.
to evaluate a tolerance on a full run); :func:`adaptive_mc_dropout_samples` draws only the
passes it needs; :func:`summarize_ragged` summarizes galaxies with different sample counts.

Kept beside its benchmark (``benchmarks/bench_adaptive.py``), not in ``gampen_ml``: no
stage uses it: on the CPU the per-round HPD check costs about what the skipped passes save
(``benchmarks/results/adaptive.md``). Wiring it in means an ``InferenceConfig`` switch read
by ``gampen_ml.stages.predict_catalog``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from gampen_ml.data.transforms import arsinh_image
from gampen_ml.infer import (
    InferenceError,
    chunk_seed,
    default_tail_batch_bytes,
    fold_batch_norm,
    pick_device,
    set_mc_dropout_mode,
    tail_draws,
)
from gampen_ml.posterior import _hpd_from_sorted, summarize

#: Default: bounds must move by less than 5 % of the posterior std between rounds.
DEFAULT_REL_TOL = 0.05
#: Default credible level whose bounds are watched.
DEFAULT_LEVEL = 0.9545


def hpd_bounds(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HPD bounds and std of every galaxy and parameter.

    Parameters
    ----------
    samples : (N, T, P) ndarray
    level : float

    Returns
    -------
    lo, hi, std : (N, P) float64 ndarrays
    """
    x = np.sort(np.asarray(samples, dtype=np.float64), axis=1)
    n, t, p = x.shape
    flat = np.moveaxis(x, 2, 1).reshape(n * p, t)
    lo, hi = _hpd_from_sorted(flat, level)
    std = flat.std(axis=1, ddof=1)
    return lo.reshape(n, p), hi.reshape(n, p), std.reshape(n, p)


def bounds_converged(
    previous: tuple[np.ndarray, np.ndarray],
    current: tuple[np.ndarray, np.ndarray, np.ndarray],
    rel_tol: float,
) -> np.ndarray:
    """``(N,)`` bool: every parameter's bounds moved by < ``rel_tol`` x its std."""
    lo0, hi0 = previous
    lo, hi, std = current
    scale = np.maximum(std, np.finfo(np.float64).tiny)
    moved = np.maximum(np.abs(lo - lo0), np.abs(hi - hi0)) / scale
    return np.all(moved < rel_tol, axis=1)


def stopping_samples(
    samples: np.ndarray,
    batch_samples: int,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    level: float = DEFAULT_LEVEL,
) -> np.ndarray:
    """Samples the adaptive rule would have used, given the full ``(N, T, P)`` draws.

    Rounds of ``batch_samples``; a galaxy stops at the first round (>= 2) whose ``level``
    HPD bounds moved by < ``rel_tol`` std since the previous round; else it uses all ``T``.

    Returns
    -------
    (N,) int64 ndarray
        Multiples of ``batch_samples`` (or ``T``).
    """
    samples = np.asarray(samples)
    n, t, _ = samples.shape
    if batch_samples < 1 or batch_samples >= t:
        raise InferenceError(f"batch_samples must lie in [1, {t}), got {batch_samples}")
    used = np.full(n, t, dtype=np.int64)
    active = np.arange(n)
    previous = hpd_bounds(samples[:, :batch_samples], level)[:2]
    for end in range(2 * batch_samples, t + 1, batch_samples):
        current = hpd_bounds(samples[active, :end], level)
        done = bounds_converged((previous[0][active], previous[1][active]), current, rel_tol)
        used[active[done]] = end
        previous[0][active], previous[1][active] = current[0], current[1]
        active = active[~done]
        if active.size == 0:
            break
    return used


@dataclass(frozen=True)
class AdaptiveChunk:
    """Samples of one chunk of galaxies with a per-galaxy number of passes.

    Attributes
    ----------
    start : int
        Index of the chunk's first galaxy.
    samples : (n, max_passes * K, 3) float32 ndarray
        Scaled-space samples; NaN beyond ``n_samples[i]`` for galaxy ``i``.
    n_samples : (n,) int64 ndarray
        Samples drawn for each galaxy (passes used x ``draws_per_pass``).
    """

    start: int
    samples: np.ndarray
    n_samples: np.ndarray


@torch.inference_mode()
def adaptive_mc_dropout_samples(
    model: nn.Module,
    images: np.ndarray,
    max_passes: int,
    *,
    seed: int,
    batch_passes: int = 50,
    rel_tol: float = DEFAULT_REL_TOL,
    level: float = DEFAULT_LEVEL,
    device: str | torch.device | None = None,
    galaxies_per_batch: int = 32,
    draws_per_pass: int = 1,
    autocast_bf16: bool = True,
) -> Iterator[AdaptiveChunk]:
    """MC dropout like :func:`gampen_ml.infer.mc_dropout_samples`, stopping converged galaxies.

    Parameters
    ----------
    model, images, seed, device, galaxies_per_batch, draws_per_pass, autocast_bf16
        As in :func:`gampen_ml.infer.mc_dropout_samples`.
    max_passes : int
        Passes for a galaxy that never converges (paper: 1000).
    batch_passes : int
        Passes per round; the first check happens after two rounds.
    rel_tol : float
        Bounds may move by less than ``rel_tol`` x posterior std between rounds.
    level : float
        Credible level whose HPD bounds are watched.

    Yields
    ------
    AdaptiveChunk
        One per chunk of ``galaxies_per_batch`` galaxies, in order.
    """
    if not 1 <= batch_passes < max_passes:
        raise InferenceError(f"batch_passes must lie in [1, {max_passes}), got {batch_passes}")
    if galaxies_per_batch < 1 or draws_per_pass < 1:
        raise InferenceError(
            f"galaxies_per_batch and draws_per_pass must be >= 1, got {galaxies_per_batch}, "
            f"{draws_per_pass}"
        )
    device = pick_device(device)
    model = model.to(device)
    previous_modes = set_mc_dropout_mode(model)
    net = fold_batch_norm(model)
    use_amp = autocast_bf16 and device.type == "cuda"
    budget = default_tail_batch_bytes(device)
    k = draws_per_pass
    try:
        for start in range(0, len(images), galaxies_per_batch):
            chunk = np.asarray(images[start : start + galaxies_per_batch], dtype=np.float32)
            if chunk.ndim == 3:
                chunk = chunk[:, None]
            x = torch.from_numpy(arsinh_image(chunk)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                head = net.deterministic_head(x)
            n = head.shape[0]
            max_rows = max(1, budget // max(1, head[0].numel() * head.element_size()))
            out = np.full((n, max_passes * k, 3), np.nan, dtype=np.float32)
            used = np.zeros(n, dtype=np.int64)
            active = np.arange(n)
            previous = None
            for p0 in range(0, max_passes, batch_passes):
                tc = min(batch_passes, max_passes - p0)
                draws = tail_draws(
                    net,
                    head[torch.from_numpy(active).to(device)],
                    tc,
                    chunk_seed(seed, start, p0),
                    k,
                    use_amp,
                    max_rows,
                )
                end = (p0 + tc) * k
                out[active, p0 * k : end] = draws.cpu().numpy()
                used[active] = end
                current = hpd_bounds(out[active, :end], level)
                if previous is not None:
                    done = bounds_converged(
                        (previous[0][active], previous[1][active]), current, rel_tol
                    )
                    active, current = active[~done], (current[0][~done], current[1][~done])
                else:
                    previous = (np.empty((n, 3)), np.empty((n, 3)))
                if active.size == 0:
                    break
                previous[0][active], previous[1][active] = current[0], current[1]
            yield AdaptiveChunk(start, out, used)
    finally:
        for module, mode in previous_modes.items():
            module.train(mode)


def summarize_ragged(
    samples: np.ndarray,
    n_samples: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pl.DataFrame:
    """:func:`gampen_ml.posterior.summarize` of galaxies with different sample counts.

    Parameters
    ----------
    samples : (N, T, 3) ndarray
        Samples; only the first ``n_samples[i]`` of galaxy ``i`` are used.
    n_samples : (N,) int ndarray
    transform : callable, optional
        Applied to each ``(n, t, 3)`` group before summarizing (e.g. recalibration, then
        ``LabelScaler.inverse``).

    Returns
    -------
    pl.DataFrame
        One row per galaxy, in input order, plus ``n_samples`` (int64).
    """
    samples, n_samples = np.asarray(samples), np.asarray(n_samples, dtype=np.int64)
    parts, order = [], []
    for t in np.unique(n_samples):
        rows = np.flatnonzero(n_samples == t)
        block = samples[rows, :t]
        parts.append(summarize(transform(block) if transform is not None else block))
        order.append(rows)
    table = pl.concat(parts).with_columns(pl.Series("_row", np.concatenate(order)))
    return (
        table.sort("_row")
        .drop("_row")
        .with_columns(pl.Series("n_samples", n_samples, dtype=pl.Int64))
    )
