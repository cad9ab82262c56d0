"""Specifications of the fused 1x1 stack (models/fast/pointwise.py): it is Conv1x1 -> BatchNorm ->
ReLU -> Conv1x1, exactly."""
import copy

import pytest
import torch
from torch import nn

from models import VQVAE
from models.fast.pointwise import PointwiseCore, fused_pointwise, is_pointwise_stack


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def pointwise_stack(in_channels=3, hidden=64, out_channels=8, first_bias=False, dtype=torch.float64, last_side=1):
    """Conv1x1 -> BatchNorm -> ReLU -> Conv1x1 (or, with `last_side` 2, a 2x2 stride-2 convolution)
    with BatchNorm's affine parameters moved off 1 and 0."""
    last = nn.Conv2d(hidden, out_channels, last_side, stride=last_side)
    stack = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=first_bias), nn.BatchNorm2d(hidden),
                          nn.ReLU(), last).to(dtype)
    with torch.no_grad():
        stack[1].weight.uniform_(0.5, 1.5)
        stack[1].bias.uniform_(-0.5, 0.5)
        stack[1].running_mean.uniform_(-0.2, 0.2)
        stack[1].running_var.uniform_(0.5, 2.0)
    return stack


def pixels(batch=4, channels=3, size=8, channels_last=True, dtype=torch.float64):
    # An offset mean makes the batch statistics' dependence on x matter.
    x = torch.rand(batch, channels, size, size, dtype=dtype) + 0.3
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fused(stack, x, **options):
    return fused_pointwise(x, stack[0], stack[1], stack[3], **options)


def gradients(stack, x, output, weights):
    """d(sum(output * weights)) w.r.t. x and every parameter, in a fixed order."""
    inputs = [x, stack[0].weight, stack[1].weight, stack[1].bias, stack[3].weight, stack[3].bias]
    if stack[0].bias is not None:
        inputs.append(stack[0].bias)
    # In training a bias before BatchNorm has no effect: fused, it gets no gradient at all.
    grads = torch.autograd.grad((output * weights).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@pytest.mark.parametrize("last_side", [1, 2])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_forward_equals_the_unfused_layers(training, channels_last, last_side):
    stack = pointwise_stack(last_side=last_side).train(training)
    x = pixels(channels_last=channels_last)
    expected = copy.deepcopy(stack)(x)
    out = fused(stack, x, chunk_rows=48 // last_side ** 2)
    assert out.shape == expected.shape == (4, 8, 8 // last_side, 8 // last_side)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() != channels_last


@pytest.mark.parametrize("last_side", [1, 2])
@pytest.mark.parametrize("chunk_rows", [1, 7, 48, 256, 10_000])
def test_gradients_include_the_batch_statistics_term_at_any_chunking(chunk_rows, last_side):
    # 256 pixels, 64 patches: 7 and 48 leave a ragged last chunk, 10_000 is one chunk.
    stack = pointwise_stack(last_side=last_side)
    reference = copy.deepcopy(stack)
    x = pixels().requires_grad_()
    weights = torch.randn(4, 8, 8 // last_side, 8 // last_side, dtype=torch.float64)
    expected = gradients(reference, x, reference(x), weights)
    actual = gradients(stack, x, fused(stack, x, chunk_rows=chunk_rows), weights)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    # The batch statistics carry a large share of dL/dx: dropping them would fail the check above.
    detached = copy.deepcopy(stack).eval()
    detached[1].running_mean.copy_(stack[1].running_mean)
    assert (expected[0] - gradients(detached, x, detached(x), weights)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("last_side", [1, 2])
def test_gradients_in_eval_mode_and_with_a_bias_before_batch_norm(last_side):
    for training in (True, False):
        stack = pointwise_stack(in_channels=5, first_bias=True, last_side=last_side).train(training)
        reference = copy.deepcopy(stack)
        x = pixels(channels=5).requires_grad_()
        weights = torch.randn(4, 8, 8 // last_side, 8 // last_side, dtype=torch.float64)
        expected = gradients(reference, x, reference(x), weights)
        actual = gradients(stack, x, fused(stack, x, chunk_rows=100), weights)
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


def test_work_split_across_threads_matches_one_thread_and_keeps_the_thread_count():
    stack = pointwise_stack()
    x = pixels().requires_grad_()
    weights = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    results = {}
    before = torch.get_num_threads()
    try:
        # 256 rows: 13 chunks in shares of 6 and 7; 2 chunks for 3 threads.
        for threads, chunk_rows in ((1, 20), (2, 20), (3, 128)):
            torch.set_num_threads(threads)
            copied = copy.deepcopy(stack)
            out = fused(copied, x, chunk_rows=chunk_rows)
            results[threads] = [out, *gradients(copied, x, out, weights)]
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for one, many in zip(results[1], results[threads]):
            torch.testing.assert_close(many, one, rtol=0, atol=1e-12)


def test_running_statistics_after_training_steps_match_batch_norm():
    for momentum in (0.1, None):  # None: BatchNorm's cumulative average
        stack = pointwise_stack()
        stack[1].momentum = momentum
        reference = copy.deepcopy(stack)
        for _ in range(3):
            x = pixels()
            reference(x)
            fused(stack, x, chunk_rows=48)
        assert stack[1].num_batches_tracked.item() == reference[1].num_batches_tracked.item() == 3
        torch.testing.assert_close(stack[1].running_mean, reference[1].running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(stack[1].running_var, reference[1].running_var, rtol=0, atol=1e-12)


def test_eval_mode_leaves_running_statistics_alone():
    stack = pointwise_stack().eval()
    before = {k: v.clone() for k, v in stack[1].state_dict().items()}
    with torch.inference_mode():
        fused(stack, pixels())
    for key, value in stack[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradcheck_on_a_tiny_stack():
    stack = pointwise_stack(in_channels=2, hidden=6, out_channels=3)
    x = pixels(batch=2, channels=2, size=3).requires_grad_()
    params = [stack[0].weight, stack[1].weight, stack[1].bias, stack[3].weight, stack[3].bias]

    def function(x, *_):
        return fused(stack, x, chunk_rows=5)

    # Each call updates the running statistics, which the output does not depend on in training.
    assert torch.autograd.gradcheck(function, (x, *params))


def test_core_gradcheck_with_and_without_an_output_bias():
    rows = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    A = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    bias2 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: PointwiseCore.apply(*t, 4, False), (rows, A, b, W2, bias2))
    assert torch.autograd.gradcheck(lambda *t: PointwiseCore.apply(*t, None, 4, False), (rows, A, b, W2))


def float32_against_float64(training=True, bfloat16=False):
    """The fused 128-wide stack in float32 and its layers in float64: (outputs, gradients) of each."""
    stack = pointwise_stack(hidden=128).train(training)
    x = pixels().requires_grad_()
    weights = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(stack)
    expected_out = reference(x)
    expected = gradients(reference, x, expected_out, weights)
    stack, x32 = stack.float(), x.detach().float().requires_grad_()
    out = fused(stack, x32, chunk_rows=48, bfloat16=bfloat16)
    return out, expected_out, gradients(stack, x32, out, weights.float()), expected


@pytest.mark.parametrize("training", [True, False])
def test_float32_matches_float64_to_float32_precision(training):
    # float64 falls back to addmm + relu; float32 on a CPU runs oneDNN's fused linear + ReLU.
    out, expected_out, actual, expected = float32_against_float64(training)
    assert (out - expected_out).norm() < 1e-5 * expected_out.norm()
    for got, want in zip(actual, expected):
        assert (got - want).norm() < 1e-4 * want.norm()


def test_bfloat16_core_stays_within_a_few_percent_of_float64():
    # BatchNorm's gradients w.r.t. x and the first layer are differences of nearly equal terms, so
    # bfloat16's 3 significant digits leave a few percent there (float32 layers: about 1e-3).
    out, expected_out, actual, expected = float32_against_float64(bfloat16=True)
    assert out.dtype == torch.float32
    assert (out - expected_out).norm() < 0.01 * expected_out.norm()
    for got, want in zip(actual, expected):
        assert got.dtype == torch.float32
        assert (got - want).norm() < 0.1 * want.norm()


def test_blocks_with_counts_give_the_batch_with_every_copy_through_a_patch_stack():
    stack = pointwise_stack(last_side=2)
    blocks = pixels(batch=5, size=4).requires_grad_()
    counts = torch.tensor([1.0, 3.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    copies = blocks.repeat_interleave(counts.long(), 0)
    reference = copy.deepcopy(stack)
    weights = torch.randn(5, 8, 2, 2, dtype=torch.float64)
    out = fused_pointwise(blocks, stack[0], stack[1], stack[3], chunk_rows=3, counts=counts)
    expected = reference(copies)
    torch.testing.assert_close(out.repeat_interleave(counts.long(), 0), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(stack[1].running_var, reference[1].running_var, rtol=0, atol=1e-12)
    # A block's output gradient is that of its copies together, and so is its input gradient.
    got = gradients(stack, blocks, out, weights * counts.view(-1, 1, 1, 1))
    want = gradients(reference, blocks, reference(blocks.repeat_interleave(counts.long(), 0)),
                     weights.repeat_interleave(counts.long(), 0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-8)


def test_pixel_vqvae_encoder_and_decoder_are_pointwise_stacks():
    model = VQVAE(num_layers=0, num_embeddings=16, embedding_dim=8, adapter_layer=True,
                  pixelsight_filters=32)
    assert is_pointwise_stack(model.encoder.layers)
    assert is_pointwise_stack(model.decoder.layers[:4])
    plain = VQVAE(num_layers=1, num_embeddings=16, embedding_dim=8)
    assert not is_pointwise_stack(plain.encoder.layers)
    assert not is_pointwise_stack(plain.decoder.layers[:4])


def test_pixel_vqvae_training_step_matches_with_fused_layers():
    model = VQVAE(num_layers=0, num_embeddings=16, embedding_dim=8, adapter_layer=True,
                  pixelsight_filters=32).double().to(memory_format=torch.channels_last)
    x = pixels(batch=2, size=8)
    expected = model.decoder.layers(model.encoder.layers(x))
    encoder, decoder = model.encoder.layers, model.decoder.layers
    latents = fused_pointwise(x, encoder[0], encoder[1], encoder[3], chunk_rows=50)
    out = decoder[4](fused_pointwise(latents, decoder[0], decoder[1], decoder[3], chunk_rows=50))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_fused_stack_evaluates_on_several_threads_under_inference_mode():
    # Worker threads start outside the caller's inference mode; writing into its tensors there
    # is refused, which a single chunk on the caller's thread never shows.
    stack = pointwise_stack(dtype=torch.float32).eval()
    x = pixels(size=16, dtype=torch.float32)
    expected = stack(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = fused(stack, x, chunk_rows=64)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_autocast_runs_the_core_in_bfloat16_and_the_statistics_in_float32():
    stack = pointwise_stack(dtype=torch.float32)
    x = pixels(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fused(stack, x)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, fused(stack, x, bfloat16=True))
    assert not torch.equal(under_autocast, fused(stack, x))
