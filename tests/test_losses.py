"""Specifications of the training losses' own pieces."""
import pytest
import torch
import torch.nn.functional as F

from utils.losses import mean_squared_error


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_mean_squared_error_is_mse_loss_with_a_gradient_in_the_input_layout(layout):
    torch.manual_seed(0)
    a = torch.rand(3, 3, 8, 8).contiguous(memory_format=layout).requires_grad_()
    b = torch.rand(3, 3, 8, 8).contiguous(memory_format=layout).requires_grad_()
    mean_squared_error(a, b).backward()
    ours = a.grad, b.grad
    a.grad = b.grad = None
    F.mse_loss(a, b).backward()
    assert mean_squared_error(a, b).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)
    for mine, torchs in zip(ours, (a.grad, b.grad)):
        assert torch.allclose(mine, torchs, rtol=1e-6, atol=1e-9)
        assert mine.is_contiguous(memory_format=layout)


def test_mean_squared_error_gives_no_gradient_to_a_target_without_one():
    a = torch.rand(2, 3, 4, 4, requires_grad=True)
    b = torch.rand(2, 3, 4, 4)
    mean_squared_error(a, b).backward()
    assert b.grad is None and a.grad is not None


def test_mean_squared_error_refuses_tensors_of_different_shapes():
    with pytest.raises(ValueError, match="shapes"):
        mean_squared_error(torch.zeros(2, 3), torch.zeros(3))
