"""Monte-Carlo dropout inference (paper §4.1 and §4.4), streamed over any number of galaxies.

For each galaxy GaMPEN is run ``T`` times with dropout active; each pass predicts a mean
``mu_t`` and a covariance ``Sigma_t = L_t D_t L_t^T`` in the network's scaled label space,
and one sample is drawn from ``N(mu_t, Sigma_t)``. The ``T`` samples are the posterior.

Economics: the STN and the first convolution carry no dropout, so
:meth:`GaMPEN.deterministic_head` is evaluated once per galaxy and its output repeated
``T`` times; only :meth:`GaMPEN.stochastic_tail` runs over galaxies x passes, in large
batches. The MVN draws are vectorized: ``y = mu + L sqrt(D) z``.

Reproducibility: every (galaxy chunk, pass chunk) gets its own seed derived from
``(seed, first galaxy, first pass)``; the dropout masks and the normal draws use it, so
the same settings give the same samples bit for bit on the same device.

A model without active dropout (rate 0, which calibration may choose) gives the same
``N(mu, Sigma)`` on every pass, so it runs once per galaxy and all ``T x K`` draws come from
that one Gaussian: the same distribution for ``1/T`` of the network work.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from gampen_ml.data.transforms import LabelScaler, arsinh_image
from gampen_ml.model.loss import split_outputs, unit_lower_triangular

#: Default memory budget for one batch of repeated head outputs fed to the tail on CUDA
#: (capped at 1/8 of the card's memory: the tail's activations peak at ~5x this). At the
#: paper preset that is ~560 rows per tail call, where an H200 is saturated
#: (``benchmarks/results/gpu.md``: 512 and 1024 rows give the same passes/s).
DEFAULT_TAIL_BATCH_BYTES = 4 * 2**30
#: Default on CPU: 128 rows of the ``quick`` head per tail call. Measured on one core
#: (``benchmarks/results/inference.md``): 64 rows ~900 passes/s, 128 rows ~1,400, 192 rows
#: ~1,290 — large enough to amortize the per-call costs (dropout position draws for 14
#: layers, the per-chunk seeding), small enough that the activations stay in cache.
DEFAULT_CPU_TAIL_BATCH_BYTES = 16 * 2**20


class InferenceError(ValueError):
    """Bad arguments to MC-dropout inference; the message names the argument and value."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_tail_batch_bytes(device: torch.device) -> int:
    """Tail budget for ``device``: cache-sized on CPU, memory-sized on CUDA."""
    if device.type != "cuda":
        return DEFAULT_CPU_TAIL_BATCH_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    return min(DEFAULT_TAIL_BATCH_BYTES, total // 8)


def chunk_seed(seed: int, first_galaxy: int, first_pass: int) -> int:
    """63-bit seed of one (galaxy chunk, pass chunk), derived with NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(first_galaxy), int(first_pass)])
    hi, lo = state.generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


def set_mc_dropout_mode(model: nn.Module) -> dict[nn.Module, bool]:
    """Eval mode everywhere except dropout layers; returns the previous modes."""
    previous = {m: m.training for m in model.modules()}
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train(True)
    return previous


def has_active_dropout(model: nn.Module) -> bool:
    """Whether any dropout layer of ``model`` has a rate above 0 (passes would differ)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no batch norm, else an eval-mode copy with BN folded.

    Every ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` becomes one
    convolution with the BN's running statistics folded into its weights and bias (the BN
    turns into ``nn.Identity``). MC dropout keeps BN in eval mode, where this is the same
    affine map; it saves the BN pass over every activation of every MC pass. Training-mode
    flags of the other modules are copied as they are.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    folded = copy.deepcopy(model)
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                if bn.training:
                    raise InferenceError("fold_batch_norm: batch norm must be in eval mode")
                seq[i] = fuse_conv_bn_eval(conv.eval(), bn)
                seq[i + 1] = nn.Identity()
    return folded


def draw_from_outputs(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from ``N(mu, L diag(exp s) L^T)`` per row of network outputs.

    Parameters
    ----------
    out : (M, 9) torch.Tensor
        Network outputs ``[mu | s | l_offdiag]`` (float32).
    generator : torch.Generator
        On the device of ``out``.

    Returns
    -------
    (M, 3) torch.Tensor
        ``mu + L (exp(s / 2) * z)`` with ``z ~ N(0, I)``.
    """
    mu, log_var, l_offdiag = split_outputs(out)
    z = torch.randn(mu.shape, generator=generator, device=out.device, dtype=out.dtype)
    L = unit_lower_triangular(l_offdiag)
    return mu + (L @ (torch.exp(0.5 * log_var) * z).unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def mc_dropout_samples(
    model: nn.Module,
    images: np.ndarray,
    n_passes: int,
    *,
    seed: int,
    device: str | torch.device | None = None,
    galaxies_per_batch: int = 32,
    passes_per_chunk: int | None = None,
    autocast_bf16: bool = True,
    tail_batch_bytes: int | None = None,
    draws_per_pass: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream MC-dropout posterior samples, one chunk of galaxies at a time.

    Parameters
    ----------
    model : nn.Module
        A :class:`gampen_ml.model.GaMPEN` (or anything with ``deterministic_head`` and
        ``stochastic_tail``). It is moved to ``device``; only its dropout layers are put in
        training mode while the generator runs, and the previous modes are restored after.
    images : (N, S, S) or (N, C, S, S) array_like
        Raw images in nJy/pixel; may be a memory map (only one chunk is read at a time).
        The arsinh scaling is applied per chunk.
    n_passes : int
        Monte-Carlo passes ``T`` per galaxy (paper: 1000).
    seed : int
        Base seed; identical settings give identical samples.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    galaxies_per_batch : int
        Galaxies per chunk (the deterministic head runs on this many at once).
    passes_per_chunk : int, optional
        Passes per tail batch; by default as many as fit in ``tail_batch_bytes`` of
        repeated head outputs.
    autocast_bf16 : bool
        Run the network in bfloat16 autocast on CUDA (the default, as in training; ignored
        on CPU, which stays fp32).
        Draws are always made in float32.
    tail_batch_bytes : int, optional
        Memory budget for the repeated head outputs of one tail call: it sets the passes
        per chunk when ``passes_per_chunk`` is None, and the tail runs on slices of at most
        this many bytes (one random stream per chunk, so results depend only on the
        settings). Default: :data:`DEFAULT_TAIL_BATCH_BYTES` on CUDA,
        :data:`DEFAULT_CPU_TAIL_BATCH_BYTES` on CPU.
    draws_per_pass : int
        Draws ``K`` from each pass's ``N(mu_t, Sigma_t)`` (paper: 1). The samples still
        come from the same mixture over dropout masks, but ``K > 1`` gives the tails
        (the 99.73 % HPD needs ~1000 samples) for ``1/K`` of the network passes. Without
        active dropout (:func:`has_active_dropout`) the network runs once per galaxy and
        all ``T * K`` draws come from that pass.

    Yields
    ------
    start : int
        Index of the chunk's first galaxy.
    samples : (n, T * K, 3) float32 ndarray
        Posterior samples in the network's scaled label space.
    """
    if n_passes < 1:
        raise InferenceError(f"n_passes must be >= 1, got {n_passes}")
    if galaxies_per_batch < 1:
        raise InferenceError(f"galaxies_per_batch must be >= 1, got {galaxies_per_batch}")
    if draws_per_pass < 1:
        raise InferenceError(f"draws_per_pass must be >= 1, got {draws_per_pass}")
    if passes_per_chunk is not None and passes_per_chunk < 1:
        raise InferenceError(f"passes_per_chunk must be >= 1, got {passes_per_chunk}")
    if np.ndim(images) not in (3, 4):
        raise InferenceError(
            f"images must have shape (N, S, S) or (N, C, S, S), got {np.shape(images)}"
        )
    n_samples = n_passes * draws_per_pass
    if not has_active_dropout(model):
        n_passes, draws_per_pass = 1, n_samples
    device = pick_device(device)
    model = model.to(device)
    previous = set_mc_dropout_mode(model)
    net = fold_batch_norm(model)
    use_amp = autocast_bf16 and device.type == "cuda"
    if tail_batch_bytes is None:
        tail_batch_bytes = default_tail_batch_bytes(device)
    n_galaxies = len(images)
    try:
        for start in range(0, n_galaxies, galaxies_per_batch):
            chunk = np.asarray(images[start : start + galaxies_per_batch], dtype=np.float32)
            if chunk.ndim == 3:
                chunk = chunk[:, None]
            x = torch.from_numpy(arsinh_image(chunk)).to(device)
            n = x.shape[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                head = net.deterministic_head(x)
            per_pass = head[0].numel() * head.element_size()
            t_chunk = passes_per_chunk or max(1, tail_batch_bytes // max(1, n * per_pass))
            t_chunk = min(t_chunk, n_passes)
            max_rows = max(1, tail_batch_bytes // max(1, per_pass))
            k = draws_per_pass
            out = torch.empty((n, n_samples, 3), dtype=torch.float32, device=device)
            for p0 in range(0, n_passes, t_chunk):
                tc = min(t_chunk, n_passes - p0)
                out[:, p0 * k : (p0 + tc) * k] = tail_draws(
                    net, head, tc, chunk_seed(seed, start, p0), k, use_amp, max_rows
                )
            yield start, out.cpu().numpy()
    finally:
        for module, mode in previous.items():
            module.train(mode)


def tail_draws(
    model: nn.Module,
    head: torch.Tensor,
    n_repeats: int,
    seed: int,
    draws_per_pass: int = 1,
    autocast_bf16: bool = False,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Run the stochastic tail ``n_repeats`` times per head row and draw from each pass.

    Parameters
    ----------
    model : nn.Module
        With ``stochastic_tail``; its dropout layers must already be in training mode.
    head : (n, ...) torch.Tensor
        :meth:`GaMPEN.deterministic_head` outputs of ``n`` galaxies.
    n_repeats : int
        Passes per galaxy.
    seed : int
        Seeds the dropout masks (torch's global stream, forked) and the normal draws.
    draws_per_pass : int
        Draws ``K`` per pass.
    autocast_bf16 : bool
        bf16 autocast for the tail (CUDA).
    max_rows : int, optional
        At most this many rows per tail call (one random stream across the calls).

    Returns
    -------
    (n, n_repeats * K, 3) float32 torch.Tensor
    """
    n, device = head.shape[0], head.device
    repeated = _repeat_rows(head, n_repeats)
    max_rows = max_rows or n * n_repeats
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            params = torch.cat(
                [
                    model.stochastic_tail(repeated[r0 : r0 + max_rows])
                    for r0 in range(0, n * n_repeats, max_rows)
                ]
            )
    gen = torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)
    params = params.float()
    if draws_per_pass > 1:
        params = params.repeat_interleave(draws_per_pass, dim=0)
    return draw_from_outputs(params, gen).reshape(n, n_repeats * draws_per_pass, 3)


def _repeat_rows(head: torch.Tensor, n_repeats: int) -> torch.Tensor:
    """``(n, ...)`` -> ``(n * n_repeats, ...)``, each row repeated in place (one copy).

    4-D feature maps come back channels-last (NHWC in memory), the layout oneDNN and
    cuDNN convolve fastest; the values are those of ``repeat_interleave``.
    """
    n = head.shape[0]
    if head.ndim == 4:
        nhwc = head.permute(0, 2, 3, 1)
        rows = nhwc.unsqueeze(1).expand(n, n_repeats, *nhwc.shape[1:])
        return rows.reshape(n * n_repeats, *nhwc.shape[1:]).permute(0, 3, 1, 2)
    rows = head.unsqueeze(1).expand(n, n_repeats, *head.shape[1:])
    return rows.reshape(n * n_repeats, *head.shape[1:])


def predict_physical(samples_scaled: np.ndarray, scaler: LabelScaler) -> np.ndarray:
    """Map scaled samples ``(..., 3)`` to physical ``[bt, re_arcsec, flux_nJy]`` float64.

    B/T is snapped to exactly 0 or 1 beyond the scaler's limits (paper §5, original code).
    """
    samples_scaled = np.asarray(samples_scaled)
    if samples_scaled.shape[-1:] != (3,):
        raise InferenceError(f"samples_scaled must have shape (..., 3), got {samples_scaled.shape}")
    return scaler.inverse(samples_scaled)


def stn_crops(model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STN inputs, crops and zoom scales of a few galaxies (for paper Figs 4-5).

    ``model`` is a loaded GaMPEN (:func:`gampen_ml.train.load_trained_model`). Returns
    ``(images (n,S,S), crops (n,P,P), scales (n,))`` as float32 arrays.
    """
    x = np.asarray(images, dtype=np.float32)
    with torch.inference_mode():
        tensor = torch.from_numpy(arsinh_image(x[:, None])).to(next(model.parameters()).device)
        crops, scales = model.stn(tensor)
    return x, crops[:, 0].float().cpu().numpy(), scales.float().cpu().numpy()
