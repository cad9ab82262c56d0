"""A VQ-VAE's training step on the distinct blocks of each batch against the same step on every block.

    python bench/distinct.py --configuration=pixel_vqvae_16x16 --precision=bf16 --batches=8
    python bench/distinct.py --configuration=vqvae --batches=30

Copies of one model take their steps alternately on the same real batches in one process, so a
drift of the machine's speed falls on all alike: the fairer comparison where the difference is
small. The variants: 'by_code' runs distinct blocks and its decoder once per code in use
(models/fast/codes.py), 'distinct' runs distinct blocks through the whole model, 'whole' every block.
The first two steps of each are warm-up (the first places the codebook by k-means); the median
step is reported. Each variant is forced, also where the model would choose otherwise (2x2 layers
under bf16 run every block).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402
from models import build_model  # noqa: E402
from models.fast import accelerate  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.device import choose_device  # noqa: E402
from utils.images import to_batch  # noqa: E402
from utils.training.loop import make_optimizer, training_precision  # noqa: E402

config = dict(
    configuration="pixel_vqvae_16x16",  # a VQ-VAE of bench/throughput.py: pixel_vqvae, pixel_vqvae_16x16, vqvae
    precision="fp32",
    batch_size=64,
    batches=8,  # steps of each copy, the first two of them warm-up
    variants="by_code,distinct,whole",
    threads=0,  # torch's intra-op threads; 0 = torch's default for this machine
)
WARMUP_STEPS = 2
VARIANTS = {"by_code": "decoder by code", "distinct": "distinct blocks", "whole": "every block"}


def main(argv):
    cfg = parse_config(config, argv)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model_type, script_config = throughput.CONFIGURATIONS[cfg["configuration"]]
    if model_type != "vqvae":
        sys.exit(f"error: {cfg['configuration']} is not a VQ-VAE; distinct blocks are a VQ-VAE's")
    run_config = {**script_config, "precision": cfg["precision"], "batch_size": cfg["batch_size"]}
    device = choose_device("cpu")
    batch = cfg["batch_size"]
    train, _, source = throughput.splits(run_config["image_size"], batch * cfg["batches"], batch, run_config["seed"])
    copies = {}
    for variant in cfg["variants"].split(","):
        if variant not in VARIANTS:
            sys.exit(f"error: unknown variant {variant!r}; expected some of {', '.join(VARIANTS)}")
        torch.manual_seed(run_config["seed"])
        model = accelerate(build_model(model_type, run_config).to(device, memory_format=torch.channels_last), device).train()
        distinct = variant != "whole"
        model.run_distinct_blocks = distinct
        model.decode_by_code = variant == "by_code"
        copies[VARIANTS[variant]] = (model, make_optimizer(model, run_config, device), [])
    alternate(copies, model_type, run_config, train, cfg["batches"], device)
    print(f"{cfg['configuration']} {cfg['precision']}, {source}, batch {batch}, {torch.get_num_threads()} threads, "
          f"median of {cfg['batches'] - WARMUP_STEPS} alternating steps")
    report(copies, batch)


def alternate(copies, model_type, run_config, train, batches, device, before_step=None):
    """Training steps of each copy in turn on the same batches; each copy's seconds per step.
    `before_step(name)`, when given, runs before each copy's step, outside its time."""
    batch = run_config["batch_size"]
    for step in range(batches):
        x = to_batch(train.images[step * batch:(step + 1) * batch], device)
        for name, (model, optimizer, seconds) in copies.items():
            if before_step:
                before_step(name)
            started = time.perf_counter()
            with training_precision(run_config, device, True):
                loss = model.loss_terms(x, model(x))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - started)


def report(copies, batch):
    for name, (_, _, seconds) in copies.items():
        median = statistics.median(seconds[WARMUP_STEPS:])
        print(f"  {name:<22} {median * 1e3:8.1f} ms/step  {batch / median:8.1f} images/s")

if __name__ == "__main__":
    main(sys.argv[1:])
