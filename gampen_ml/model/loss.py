"""Full-covariance Gaussian negative log-likelihood with the LDL^T trick (paper §4.3).

Network output layout (as in the original ``ggt`` code)::

    out[:, 0:3]  mu         means of the three scaled labels
    out[:, 3:6]  s          log-variances, D = diag(exp s)
    out[:, 6:9]  l_offdiag  strictly-lower entries of the unit lower-triangular L, in
                            ``torch.tril_indices(3, 3, -1)`` order: (1,0), (2,0), (2,1)

Sigma = L D L^T. Because N = L - I is nilpotent (N^3 = 0), L^-1 = I - N + N^2 exactly, and
log det Sigma = sum s, so no matrix inverse or determinant is ever computed (eq. 13-14).
"""

from __future__ import annotations

import torch

N_PARAMS = 3
_ROWS, _COLS = torch.tril_indices(N_PARAMS, N_PARAMS, -1)


def split_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``(..., 9)`` outputs into ``mu (..., 3)``, ``log_var (..., 3)``, ``l_offdiag (..., 3)``."""
    if out.shape[-1] != 3 * N_PARAMS:
        raise ValueError(f"expected outputs with last dimension 9, got shape {tuple(out.shape)}")
    return out[..., 0:3], out[..., 3:6], out[..., 6:9]


def unit_lower_triangular(l_offdiag: torch.Tensor) -> torch.Tensor:
    """Unit lower-triangular ``L (..., 3, 3)`` from its strictly-lower entries ``(..., 3)``."""
    eye = torch.eye(N_PARAMS, dtype=l_offdiag.dtype, device=l_offdiag.device)
    L = eye.expand(*l_offdiag.shape[:-1], N_PARAMS, N_PARAMS).clone()
    L[..., _ROWS, _COLS] = l_offdiag
    return L


def covariance(out: torch.Tensor) -> torch.Tensor:
    """Predicted covariance ``Sigma = L diag(exp s) L^T``: ``(..., 9)`` -> ``(..., 3, 3)``."""
    _, log_var, l_offdiag = split_outputs(out)
    L = unit_lower_triangular(l_offdiag)
    return (L * torch.exp(log_var).unsqueeze(-2)) @ L.transpose(-1, -2)


def gaussian_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean negative log-likelihood of ``y`` under ``N(mu, Sigma)`` (paper eq. 8).

    Per galaxy: ``0.5 (y - mu)^T Sigma^-1 (y - mu) + 0.5 sum_i s_i``, without the
    ``1.5 log 2 pi`` constant (as the original code). Computed in float32 even under
    autocast.

    Parameters
    ----------
    out : torch.Tensor
        ``(N, 9)`` network outputs.
    y : torch.Tensor
        ``(N, 3)`` scaled labels.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    out = out.float()
    mu, log_var, l_offdiag = split_outputs(out)
    L = unit_lower_triangular(l_offdiag)
    nil = L - torch.eye(N_PARAMS, dtype=L.dtype, device=L.device)
    eye = torch.eye(N_PARAMS, dtype=L.dtype, device=L.device)
    L_inv = eye - nil + nil @ nil
    # Sigma^-1 = L^-T D^-1 L^-1, so the quadratic form is sum_i exp(-s_i) z_i^2, z = L^-1 r.
    z = (L_inv @ (y.float() - mu).unsqueeze(-1)).squeeze(-1)
    per_galaxy = 0.5 * (torch.exp(-log_var) * z.square()).sum(-1) + 0.5 * log_var.sum(-1)
    return per_galaxy.mean()


def mean_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``|y - mu|^2`` over the three scaled labels (float32).

    The training warm-up term (``TrainingConfig.mean_warmup_fraction``): unlike eq. 8 it
    weights every parameter's error equally, whatever variance the network predicts.
    """
    mu = split_outputs(out.float())[0]
    return (y.float() - mu).square().sum(-1).mean()
