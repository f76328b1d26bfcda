"""The FP8 backward (dL/dx from the dequantized weight) matches autograd on the dense weight."""
import torch
from torch import nn

from fastlm.patch.fp8_backward import install_fp8_backward


class _FakeFP8Linear(nn.Linear):
    """Stands in for torchao's FP8 linear on CPU: float8 weight, a forward autograd cannot differentiate."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.weight = nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x):
        with torch.no_grad():  # like _scaled_mm: no derivative
            return x @ self.weight.float().t()


def test_fp8_backward_matches_dense_reference():
    torch.manual_seed(0)
    dense = torch.randn(48, 80) * 0.1
    layer = _FakeFP8Linear(dense)
    assert install_fp8_backward(nn.Sequential(layer)) is not None
    x = torch.randn(3, 7, 80, requires_grad=True)
    grad_out = torch.randn(3, 7, 48)
    y = layer(x)
    y.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ layer.weight.float().t()
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None  # the frozen FP8 weight gets no gradient


def test_fp8_backward_in_a_deep_copy_uses_the_copys_weight():
    import copy

    torch.manual_seed(1)
    model = nn.Sequential(_FakeFP8Linear(torch.randn(16, 24) * 0.1))
    undo = install_fp8_backward(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[0].weight.copy_((torch.randn(16, 24) * 0.1).to(torch.float8_e4m3fn))
    x = torch.randn(2, 24, requires_grad=True)
    torch.testing.assert_close(clone(x), x @ clone[0].weight.float().t())
    torch.testing.assert_close(model(x), x @ model[0].weight.float().t())
    assert not torch.equal(clone(x), model(x))
    undo()
    assert "forward" not in model[0].__dict__ and "forward" in clone[0].__dict__  # the copy keeps its own patch
