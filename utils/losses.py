"""Training losses: reconstruction, the Pixel VQ-VAE's optional SSIM term, and their sum."""
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


def loss_terms(model_type, output, x, config):
    """Every loss term of one batch as tensors; 'loss' is what is minimised.

    Kept on the device: reading them back every step would stall the pipeline."""
    recon = F.mse_loss(output.reconstruction.float(), x.float())
    terms = {"recon": recon}
    if model_type == "vae":
        terms["kl"] = output.kl
        terms["loss"] = recon + output.kl_loss
        return terms
    terms["vq"] = output.vq_loss
    image = output.reconstruction
    if output.palette is None:
        loss = recon + output.vq_loss
    else:
        # The chosen colours carry no gradient: the choice is trained by its cross-entropy, and
        # "recon" stays the MSE of what the model outputs, comparable with the other models'.
        terms["palette"] = output.palette.cross_entropy()
        loss = terms["palette"] + output.vq_loss
    if config.get("use_ssim_loss"):
        if output.palette is not None:
            image = output.palette.expected_colours()
        terms["ssim"] = 1 - ssim(image, x)
        loss = loss + config["ssim_weight"] * terms["ssim"]
    terms["loss"] = loss
    return terms
