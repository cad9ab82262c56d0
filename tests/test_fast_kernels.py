"""Specifications of the CPU kernels (models/fast/kernels.cpp): they build where a C++ compiler is,
agree with torch's ops, and their absence leaves torch's ops doing the same work."""
import copy
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from models.fast import kernels
from models.fast.batchnorm import run_fusing_batch_norm_relu, runs_fused_with_relu
from models.fast.quantizer import nearest_code
from tests.helpers import bn_relu_stack, counting_fused_calls, kernel_vqvae, needs_compiler, seeded_run

CHANNELS_LAST = torch.channels_last


@needs_compiler
def test_the_kernels_build_where_there_is_a_cpp_compiler():
    assert kernels.available()


def test_a_failed_build_warns_once_and_leaves_torch_ops_in_charge(monkeypatch):
    def no_ninja(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_ninja)
    with pytest.warns(UserWarning, match="could not be built .Ninja is required"):
        assert kernels._build.__wrapped__() is False


@needs_compiler
@pytest.mark.parametrize("rows, codes, dim", [(5000, 256, 32), (999, 1024, 64), (1001, 16, 3), (77, 48, 5)])
def test_the_kernels_nearest_code_is_the_exact_nearest_one_the_first_of_duplicates(rows, codes, dim):
    torch.manual_seed(0)
    x, codebook = torch.randn(rows, dim), torch.randn(codes, dim)
    codebook[codes - 1] = codebook[3]  # a restarted code can duplicate another: the first one wins
    x[:3] = codebook[3]
    expected = (x.unsqueeze(1) - codebook).square().sum(2).argmin(1)
    found = kernels.nearest_code(x, codebook, codebook.square().sum(1))
    assert torch.equal(found, expected) and found[:3].tolist() == [3, 3, 3]


@needs_compiler
def test_the_kernels_nearest_code_takes_nan_for_a_minimum_as_argmin_does():
    torch.manual_seed(0)
    x, codebook = torch.randn(20, 8), torch.randn(32, 8)
    x[4, 2] = float("nan")  # every distance of row 4 is NaN: argmin gives code 0
    codebook[20, 1] = float("nan")  # code 20 is NaN for every row: argmin gives it, unless row 4
    norms = codebook.square().sum(1)
    found = kernels.nearest_code(x, codebook, norms)
    assert torch.equal(found, torch.addmm(norms, x, codebook.t(), alpha=-2).argmin(1))
    assert found[4] == 0 and (found[torch.arange(20) != 4] == 20).all()


def test_nearest_code_is_the_same_on_one_thread_and_two():
    torch.manual_seed(0)
    x, codebook = torch.randn(4099, 32), torch.randn(256, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nearest_code(x, codebook)
        torch.set_num_threads(2)
        two = nearest_code(x, codebook)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def assert_near(got, torchs, want, name=""):
    """got no further from float64 `want` than torch's own float32 result, or than 1e-4 of the
    size of the quantity's largest values."""
    error = (got.double() - want).abs().max().item()
    allowed = max((torchs.double() - want).abs().max().item(), 1e-4 * want.abs().max().item(), 1e-7)
    assert error <= allowed, f"{name}: off by {error:.3g}, allowed {allowed:.3g}"


@needs_compiler
@pytest.mark.parametrize("channels, shape, mean, spread", [(16, (32, 16, 16, 16), 0.0, 1.0), (64, (16, 64, 16, 16), 5.0, 3.0),
                                                           (32, (16, 32, 16, 16), 1000.0, 0.01)])
def test_fused_batchnorm_relu_trains_as_batchnorm_then_relu_do_in_float64(channels, shape, mean, spread):
    # The last case has a mean 10^5 times its spread, where E[x^2] - E[x]^2 would cancel to noise
    # (there torch's float32 BatchNorm is 0.025 off, the kernel 0.004).
    torch.manual_seed(0)
    fused = bn_relu_stack(channels)
    torchs, exact = copy.deepcopy(fused), copy.deepcopy(fused).double()
    x = (torch.randn(shape) * spread + mean).to(memory_format=CHANNELS_LAST)
    inputs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(), x.double().requires_grad_()]
    assert runs_fused_with_relu(fused[0], fused[1], x)
    outputs = [run_fusing_batch_norm_relu(fused, inputs[0]), torchs(inputs[1]), exact(inputs[2])]
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad.to(out.dtype))
    assert outputs[0].is_contiguous(memory_format=CHANNELS_LAST)
    assert inputs[0].grad.is_contiguous(memory_format=CHANNELS_LAST)
    assert_near(*outputs, "output")
    assert_near(*(i.grad for i in inputs), "input gradient")
    for (name, got), (_, mine), (_, want) in zip(fused.named_parameters(), torchs.named_parameters(), exact.named_parameters()):
        assert_near(got.grad, mine.grad, want.grad, name)
    for (name, got), (_, mine), (_, want) in zip(fused.named_buffers(), torchs.named_buffers(), exact.named_buffers()):
        assert_near(got, mine, want, name)


@needs_compiler
def test_batchnorm_relu_is_fused_only_in_training_on_float32_channels_last_multiples_of_16():
    stack = bn_relu_stack(16)
    x = torch.randn(16, 16, 16, 16).to(memory_format=CHANNELS_LAST)
    bn, relu = stack[0], stack[1]
    assert runs_fused_with_relu(bn, relu, x)
    assert not runs_fused_with_relu(bn, relu, x.contiguous())
    assert not runs_fused_with_relu(bn, relu, x.bfloat16())
    assert not runs_fused_with_relu(bn, nn.Identity(), x)
    assert not runs_fused_with_relu(bn_relu_stack(3)[0], relu, torch.randn(16, 3, 16, 16).to(memory_format=CHANNELS_LAST))
    assert not runs_fused_with_relu(bn.eval(), relu, x)


@needs_compiler
def test_a_vqvae_trains_the_same_with_the_kernels_and_without(monkeypatch):
    model, images = kernel_vqvae()
    without = copy.deepcopy(model)
    fused_calls = counting_fused_calls(monkeypatch)
    with_kernels, _ = seeded_run(model, images)
    assert fused_calls
    monkeypatch.setattr(kernels, "available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_only, _ = seeded_run(without, images)
    assert with_kernels == pytest.approx(torch_only, rel=1e-4)
    for (name, got), (_, want) in zip(model.state_dict().items(), without.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)


def test_the_ninja_requirements_txt_installs_is_found_off_path(monkeypatch):
    import ninja  # a requirement (requirements.txt)
    monkeypatch.setenv("PATH", "/nonexistent")
    kernels._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")
