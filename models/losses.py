"""Loss pieces the models share: the reconstruction's MSE, SSIM (the Pixel VQ-VAE's optional term)
and the VQ commitment loss.

Each model sums its own terms in its `loss_terms`; these are the pieces written once for all."""
import functools

import torch
import torch.nn.functional as F


# tf.image.ssim's defaults, which the paper used: an 11x11 Gaussian window of sigma 1.5.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


@functools.lru_cache(maxsize=8)
def _gaussian_window(channels, device, dtype):
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).to(device, dtype).contiguous()


def ssim(x, y):
    """Mean SSIM of two image batches in [0, 1], differentiable.

    Only windows that fit inside the image count ('valid'), as in scikit-image's and TensorFlow's
    reference implementations, so the training term and the reported metric agree."""
    # At least float32 (a bfloat16 reconstruction's windowed sums would lose the small variances).
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    channels = x.shape[1]
    window = _gaussian_window(channels, x.device, x.dtype)
    blur = functools.partial(F.conv2d, weight=window, groups=channels)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean()


def reconstruction_loss(reconstruction, x):
    """The mean squared error of a reconstruction of x, in at least float32 (in bfloat16 the small
    errors of a good reconstruction would round away)."""
    dtype = torch.promote_types(reconstruction.dtype, torch.float32)
    return F.mse_loss(reconstruction.to(dtype), x.to(dtype))


def commitment_loss(z, codes, commitment_cost, counts=None):
    """commitment_cost times the mean squared distance of latents z [B, D, H, W] from their codes,
    which carry no gradient, so the loss pulls only z towards them. With `counts`, row u of z
    stands for counts[u] latents (models/fast/distinct.py)."""
    if counts is None:
        return commitment_cost * F.mse_loss(z, codes)
    return commitment_cost / (counts.sum() * z[0].numel()) * (counts @ (z - codes).square().sum([1, 2, 3]))
