"""A small GPT (after nanoGPT's model.py) over a VQ model's code grid read in raster order.

The first position holds the condition (a class such as the background, or one start token when
there is none) and predicts the first code; position t predicts code t from the codes before it.
Sampling keeps each layer's keys and values (a KV cache), so a grid of n codes costs n one-token
passes instead of n passes over the whole sequence."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import check_sampling, draw, seeded


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width ({width}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, 2))
        if cache is not None:
            if "k" in cache:
                if length != 1:
                    raise ValueError("a filled KV cache takes one new position at a time")
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # One new query after a cache sees every cached key, so only a whole sequence needs the mask.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPTPrior(nn.Module):
    """Codes [B, H, W] -> logits [B, num_embeddings, H, W] of each code given those before it in
    raster order (the PixelCNN's interface). With `num_classes` > 0, `forward` takes one label per
    grid, which is the first position's token."""

    def __init__(self, num_embeddings: int, code_cells: int, width: int = 128, num_layers: int = 4,
                 num_heads: int = 4, dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.num_embeddings, self.code_cells, self.num_classes = num_embeddings, code_cells, num_classes
        self.token = nn.Embedding(num_embeddings, width)
        self.condition = nn.Embedding(max(num_classes, 1), width)
        self.position = nn.Embedding(code_cells, width)
        self.blocks = nn.ModuleList(Block(width, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_embeddings, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's: small normal weights, so the first logits are near uniform over the codes.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _labels(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels are needed exactly when num_classes > 0 (num_classes="
                             f"{self.num_classes}, labels given: {labels is not None})")
        return torch.zeros(batch, dtype=torch.long, device=device) if labels is None else labels.to(device)

    def _logits(self, x: Tensor, caches: list[dict] | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def _cells(self, height: int, width: int) -> int:
        cells = height * width
        if cells > self.code_cells:
            raise ValueError(f"a grid of {cells} codes is longer than the prior's {self.code_cells}")
        return cells

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        batch, height, width = codes.shape
        cells = self._cells(height, width)
        flat = codes.reshape(batch, cells)
        start = self.condition(self._labels(labels, batch, codes.device))[:, None]
        x = torch.cat([start, self.token(flat[:, :-1])], 1) + self.position.weight[:cells]
        return self._logits(x).transpose(1, 2).reshape(batch, self.num_embeddings, height, width)

    @torch.inference_mode()
    def sample(self, shape: tuple[int, int, int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | int | None = None, labels: Tensor | None = None,
               prefix: Tensor | None = None, keep: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """Codes [n, h, w] drawn one at a time in raster order (models/sampling.py's `draw`).

        Where bool `keep` [n, h, w] is set, the code of `prefix` [n, h, w] is kept instead of drawn,
        and the codes after it are drawn given it; `bias` [n, h, w, K] is added to each cell's logits.
        A fusion keeps one parent's region and pulls the rest towards the other's codes."""
        check_sampling(temperature, top_k, top_p)
        count, height, width = shape
        cells = self._cells(height, width)
        device = self.head.weight.device
        generator = seeded(generator, device)
        if (prefix is None) != (keep is None):
            raise ValueError("prefix and keep go together")
        if keep is not None:
            keep, prefix = keep.to(device).reshape(count, cells), prefix.to(device).reshape(count, cells).long()
        if bias is not None:
            bias = bias.to(device).reshape(count, cells, -1)
        caches = [{} for _ in self.blocks]
        x = self.condition(self._labels(labels, count, device))[:, None] + self.position.weight[:1]
        codes = torch.zeros(count, cells, dtype=torch.long, device=device)
        for t in range(cells):
            logits = self._logits(x, caches)[:, -1]
            code = draw(logits if bias is None else logits + bias[:, t], temperature, top_k, top_p, generator)
            if keep is not None:
                code = torch.where(keep[:, t], prefix[:, t], code)
            codes[:, t] = code
            if t + 1 < cells:
                x = self.token(code)[:, None] + self.position.weight[t + 1]
        return codes.reshape(count, height, width)
