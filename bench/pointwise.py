"""Training-step throughput of the paper's Pixel VQ-VAE with and without the fused 1x1 stacks.

    nice -n 19 python bench/pointwise.py                   # unfused, fused fp32, fused bf16
    nice -n 19 python bench/pointwise.py --threads=1 --steps=3

Each mode times whole training steps (forward, loss, backward, Adam) on one fixed batch of
palette sprites, after warm-up steps that also run the k-means codebook placement. The fused modes
swap the encoder's and decoder's forward for `fused_pointwise` on this model only; parameters,
buffers and the optimiser are the same. Wall clock is what a run sees; CPU time per step is shown
beside it because on a shared machine it is the steadier of the two. The first step's loss, from
the same weights, batch and k-means seed, shows the modes compute the same thing.
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import VQVAE  # noqa: E402
from models.fast.pointwise import fused_pointwise, is_pointwise_stack  # noqa: E402
from utils.config import parse_config  # noqa: E402

config = dict(
    batch_size=64,
    image_size=64,
    steps=5,  # timed steps per mode; the median is reported
    warmup_steps=2,
    threads=2,
    modes="unfused,fp32,bf16",  # fp32 and bf16: the fused stacks with float32 or bfloat16 products
    chunk_rows=0,  # 0 = the module's default for the thread count
    seed=0,
)
# The paper's Pixel VQ-VAE, as train_pixel_vqvae.py configures it.
model_config = dict(num_layers=0, adapter_layer=True, pixelsight_filters=512, num_embeddings=256,
                    embedding_dim=32, commitment_cost=0.25, ema_decay=0.99, kmeans_init=True,
                    dead_code_threshold=0.5)
LEARNING_RATE = 1e-4


def palette_sprites(count: int, size: int) -> torch.Tensor:
    """Blocky sprites in a handful of colours with black and white, channels-last [count, 3, size, size]."""
    palette = torch.cat([torch.tensor([[0.0, 0, 0], [1, 1, 1]]), torch.rand(6, 3)])
    blocks = torch.randint(len(palette), (count, size // 4, size // 4))
    colours = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return palette[colours].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def use_fused_stacks(model: VQVAE, chunk_rows: int, bfloat16: bool) -> None:
    encoder, decoder = model.encoder.layers, model.decoder.layers
    assert is_pointwise_stack(encoder) and is_pointwise_stack(decoder[:4])
    model.encoder.forward = lambda x: fused_pointwise(x, encoder[0], encoder[1], encoder[3],
                                                      chunk_rows, bfloat16)
    model.decoder.forward = lambda z: decoder[4](fused_pointwise(z, decoder[0], decoder[1], decoder[3],
                                                                 chunk_rows, bfloat16))


def time_steps(model: VQVAE, x: torch.Tensor, steps: int, warmup_steps: int) -> tuple[float, float, float]:
    """Median wall-clock and CPU seconds of a training step, and the first step's loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    walls, cpus, losses = [], [], []
    for step in range(warmup_steps + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = model.loss_terms(x, model(x))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step >= warmup_steps:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), losses[0]


def main(argv: list[str]) -> None:
    cfg = parse_config(config, argv)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    x = palette_sprites(cfg["batch_size"], cfg["image_size"])
    reference = VQVAE(**model_config).to(memory_format=torch.channels_last)
    print(f"batch {cfg['batch_size']} x {cfg['image_size']}^2, {cfg['threads']} threads, median of "
          f"{cfg['steps']} steps after {cfg['warmup_steps']} warm-up")
    print(f"{'mode':>8} {'images/s':>9} {'s/step':>7} {'cpu s/step':>10} {'first loss':>11}")
    for mode in cfg["modes"].split(","):
        model = copy.deepcopy(reference)
        # The reference model's forward with only its layer stacks swapped: the fused stacks over
        # every pixel, as this bench has always timed them; distinct pixels (models/fast/distinct.py)
        # would leave each mode a few dozen palette colours to run.
        torch.manual_seed(cfg["seed"])  # the same k-means placement in every mode
        if mode != "unfused":
            use_fused_stacks(model, cfg["chunk_rows"], bfloat16=mode == "bf16")
        wall, cpu, loss = time_steps(model, x, cfg["steps"], cfg["warmup_steps"])
        print(f"{mode:>8} {cfg['batch_size'] / wall:9.1f} {wall:7.3f} {cpu:10.3f} {loss:11.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
