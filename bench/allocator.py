"""Training steps with glibc keeping freed memory (utils/device.py) against glibc's defaults.

    python bench/allocator.py --configuration=vae --batches=10
    python bench/allocator.py --configuration=pixel_vqvae_16x16 --precision=bf16 --batches=6

Two copies of one model take their steps alternately on the same real batches in one process;
before each step the allocator is set one way or the other (mallopt is process-wide and takes
effect at once), and glibc hands back what it holds before a default step, so that step meets
fresh pages as it would by default. The first two steps of each are warm-up; the median is reported.
"""
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402
from distinct import WARMUP_STEPS, alternate, report  # noqa: E402
from models import build_model  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.device import LARGEST_INT, M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, keep_freed_memory  # noqa: E402
from utils.training.fast_path import accelerated  # noqa: E402
from utils.training.loop import make_optimizer  # noqa: E402

config = dict(
    configuration="vae",  # a configuration of bench/throughput.py
    precision="fp32",
    batch_size=64,
    batches=10,  # steps of each copy, the first two of them warm-up
    threads=0,  # torch's intra-op threads; 0 = torch's default for this machine
)
# glibc's own starting thresholds (it raises the mmap one by itself as the process frees blocks).
GLIBC_DEFAULT_THRESHOLD = 128 * 1024
KEPT, DEFAULT = "freed memory kept", "glibc defaults"


def set_allocator(name, libc):
    threshold = LARGEST_INT if name == KEPT else GLIBC_DEFAULT_THRESHOLD
    for parameter, value in ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold), (M_TOP_PAD, 0)):
        libc.mallopt(parameter, value)
    if name == DEFAULT:
        libc.malloc_trim(0)


def main(argv):
    cfg = parse_config(config, argv)
    if not keep_freed_memory():
        sys.exit("error: this C library is not glibc; there is no allocator setting to compare")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model_type, script_config = throughput.CONFIGURATIONS[cfg["configuration"]]
    run_config = {**script_config, "precision": cfg["precision"], "batch_size": cfg["batch_size"]}
    device = torch.device("cpu")
    batch = cfg["batch_size"]
    train, _, source = throughput.splits(run_config["image_size"], batch * cfg["batches"], batch, run_config["seed"])
    copies = {}
    for name in (KEPT, DEFAULT):
        torch.manual_seed(run_config["seed"])
        model = build_model(model_type, run_config).to(device, memory_format=torch.channels_last).train()
        copies[name] = (accelerated(model, run_config, device), make_optimizer(model, run_config, device), [])
    libc = ctypes.CDLL("libc.so.6")
    alternate(copies, model_type, run_config, train, cfg["batches"], device, lambda name: set_allocator(name, libc))
    set_allocator(KEPT, libc)
    print(f"{cfg['configuration']} {cfg['precision']}, {source}, batch {batch}, {torch.get_num_threads()} threads, "
          f"median of {cfg['batches'] - WARMUP_STEPS} alternating steps")
    report(copies, batch)


if __name__ == "__main__":
    main(sys.argv[1:])
