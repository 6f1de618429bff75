"""The LDL^T Gaussian NLL against torch.distributions, and its numerical robustness."""

import math

import torch

from gampen_ml.model.loss import covariance, gaussian_nll, split_outputs, unit_lower_triangular


def _random_outputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 9, generator=g, dtype=torch.float64)
    out[:, 3:6] *= 1.5  # log-variances over a few e-folds
    y = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2
    return out, y


def test_layout_and_covariance():
    out = torch.arange(9, dtype=torch.float64).unsqueeze(0)
    mu, log_var, l_off = split_outputs(out)
    assert mu.tolist() == [[0, 1, 2]] and log_var.tolist() == [[3, 4, 5]]
    L = unit_lower_triangular(l_off)[0]
    # tril_indices(3, 3, -1) order: (1,0), (2,0), (2,1)
    assert L.tolist() == [[1, 0, 0], [6, 1, 0], [7, 8, 1]]
    D = torch.diag(torch.exp(torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)))
    torch.testing.assert_close(covariance(out)[0], L @ D @ L.T)


def test_nll_matches_multivariate_normal():
    out, y = _random_outputs(64)
    mu = out[:, :3]
    cov = covariance(out)
    reference = -torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(y)
    reference = reference - 1.5 * math.log(2 * math.pi)  # the loss drops the 2 pi constant
    # The loss runs in float32; compare against the float64 reference.
    ours = gaussian_nll(out.float(), y.float())
    assert abs(ours.item() - reference.mean().item()) < 1e-5 * max(
        1.0, abs(reference.mean().item())
    )
    # Per-galaxy agreement (batch of one each) as well.
    for i in (0, 17, 63):
        single = gaussian_nll(out[i : i + 1].float(), y[i : i + 1].float()).item()
        assert abs(single - reference[i].item()) < 1e-4 * max(1.0, abs(reference[i].item()))


def test_nll_value_by_hand():
    # Diagonal Sigma = diag(e^0, e^2, e^-2), mu = 0, y = (1, 1, 1), L = I:
    # 0.5 * (1 + e^-2 + e^2) + 0.5 * (0 + 2 - 2)
    out = torch.tensor([[0, 0, 0, 0, 2, -2, 0, 0, 0]], dtype=torch.float32)
    y = torch.ones(1, 3)
    expected = 0.5 * (1 + math.exp(-2) + math.exp(2))
    assert abs(gaussian_nll(out, y).item() - expected) < 1e-5


def test_gradients_finite_for_extreme_log_variances():
    out, y = _random_outputs(32, seed=3)
    out = out.float()
    out[:16, 3:6] = 30.0
    out[16:, 3:6] = -30.0
    out.requires_grad_(True)
    loss = gaussian_nll(out, y.float())
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(out.grad).all()


def test_bf16_outputs_are_computed_in_float32():
    out, y = _random_outputs(8, seed=5)
    ref = gaussian_nll(out.float(), y.float())
    low = gaussian_nll(out.bfloat16(), y.float())
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item()) + 0.05
