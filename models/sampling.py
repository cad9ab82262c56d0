"""Drawing one code per grid from a prior's logits: temperature, top-k and top-p (nucleus)."""
import torch
import torch.nn.functional as F
from torch import Tensor


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (every code) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be above 0 and at most 1, got {top_p}")


def filtered_probabilities(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """softmax(logits / temperature) [B, K] over the `top_k` likeliest codes (0: all) and, of those,
    the smallest set whose probability reaches `top_p`, renormalised."""
    check_sampling(temperature, top_k, top_p)
    # float32, as half-precision logits over a small temperature would overflow.
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        # A code is kept while the codes likelier than it hold less than top_p: the likeliest always is.
        before = ordered.cumsum(-1) - ordered
        ordered = ordered.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> Tensor:
    """One code [B] per row of `logits` [B, K]."""
    probs = filtered_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def seeded(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """An int seeds a fresh generator on `device`; a generator or None is kept."""
    return torch.Generator(device).manual_seed(generator) if isinstance(generator, int) else generator
