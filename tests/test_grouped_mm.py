"""Expert weights whose gradient goes straight into an fp32 sum (`main_grad`, Megatron's gradient-accumulation
fusion): the forward and the input gradient are those of the plain path, the weight gets no `.grad`, and the sum
over micro-batches is the exact (fp64) sum of their products to fp32 precision."""

import pytest
import torch

from jetmoe.model import GroupedExperts

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [torch.tensor([5, 0, 7, 4]), torch.tensor([0, 9, 3, 4]), torch.tensor([16, 0, 0, 0])]


def _layer(width, seed=0):
    torch.manual_seed(seed)
    layer = GroupedExperts(4, width, 48).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.1)
    return layer


def _exact_product(grad, x, counts):
    out, start = [], 0
    for n in counts.tolist():
        out.append(grad[start:start + n].double().t() @ x[start:start + n].double())
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("width", [32, 30])  # 32: one grouped matmul; 30 (rows not 16-byte aligned): the loop
def test_weight_gradient_goes_into_the_fp32_sum_exactly(width):
    fused, plain = _layer(width), _layer(width)
    fused.weight.main_grad = torch.zeros(fused.weight.shape)
    exact = torch.zeros(fused.weight.shape, dtype=torch.float64)
    for counts in COUNTS:
        x = torch.randn(16, width, dtype=torch.bfloat16)
        grad = torch.randn(16, 48, dtype=torch.bfloat16)
        x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_fused, y_plain = fused(x_fused, counts), plain(x_plain, counts)
        y_fused.backward(grad)
        y_plain.backward(grad)
        assert torch.equal(y_fused, y_plain) and torch.equal(x_fused.grad, x_plain.grad)
        exact += _exact_product(grad, x, counts)
    assert fused.weight.grad is None
    scale = exact.abs().max()
    assert float((fused.weight.main_grad.double() - exact).abs().max() / scale) < 1e-6
    # the plain path's bf16 gradients, summed, are far off: the check can fail
    assert float((plain.weight.grad.double() - exact).abs().max() / scale) > 1e-4
    assert torch.equal(fused.weight.main_grad[1] != 0, exact[1] != 0)  # an expert with no rows in a step adds 0


def test_without_gradients_the_sum_is_left_alone():
    layer = _layer(32)
    layer.weight.main_grad = torch.zeros(layer.weight.shape)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x, COUNTS[0])
    plain = _layer(32)
    assert torch.equal(y, plain(x, COUNTS[0])) and not layer.weight.main_grad.any()
