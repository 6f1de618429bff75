"""The benchmarks' reference network computes what the platform's network computes."""

import torch
from torch import nn

from benchmarks.reference import reference_model
from gampen_ml.config import QUICK
from gampen_ml.model import GaMPEN
from gampen_ml.model.dropout import SparseDropout


def test_reference_model_is_the_same_function_with_stock_ops():
    torch.manual_seed(0)
    model = GaMPEN(QUICK.network, 0.05, 239)
    with torch.no_grad():
        model.stn.regressor[-1].bias.fill_(0.6)  # a real zoom, not the identity
    ref = reference_model(model)
    assert not any(isinstance(m, SparseDropout) for m in ref.modules())
    assert sum(isinstance(m, nn.Dropout) for m in ref.modules()) == 14
    assert any(isinstance(m, SparseDropout) for m in model.modules())  # original untouched
    x = torch.asinh(torch.rand(3, 1, 239, 239) * 50)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-5, rtol=1e-4)
