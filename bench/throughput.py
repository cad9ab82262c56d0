"""Training throughput of every model configuration, beside the reference implementation's.

    python bench/throughput.py                                 # every configuration, fp32 and bf16
    python bench/throughput.py --configurations=vqvae --precisions=fp32 --repeats=3
    python bench/throughput.py --prepare=True                  # also time preparing the full data set

Each configuration and precision runs in a process of its own, so its peak memory is its own. It
builds the model as its training script does and times the training loop itself (`run_epoch`:
batches cut from packed uint8 arrays, forward, loss, backward, optimiser step): one warm-up pass
(which also places the codebook by k-means), then `repeats` passes of `steps` batches; the median
pass and the spread are reported. Model FLOPs per image (forward and backward, counted op by op on
the reference model of models/, over every block) give the effective rate, compared with this
machine's matrix-multiply rate measured in the same run; a VQ-VAE runs each distinct block of a
batch once, so its effective rate can pass the ceiling, and the share of distinct blocks is shown. Evaluation of the full test split is timed per configuration.
Images are the prepared Pokemon training and test splits when `data/pokemon` exists, otherwise
synthetic palette sprites of the same size.
"""
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_pixel_vqvae  # noqa: E402
import train_tokenizer  # noqa: E402
import train_vae  # noqa: E402
import train_vqvae  # noqa: E402
from models import build_model  # noqa: E402
from models.fast import kernels  # noqa: E402
from models.fast.distinct import distinct_blocks  # noqa: E402
from models.fast.threads import cpu_has_bfloat16  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.data.fetch import fetch_pokemon  # noqa: E402
from utils.data.load import SpriteSet  # noqa: E402
from utils.data.prepare import DATA, PrepareOptions, prepare  # noqa: E402
from utils.device import choose_device, describe_machine  # noqa: E402
from utils.images import to_batch  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.training.fast_path import accelerated  # noqa: E402
from utils.training.loop import (make_discriminator_optimizer, make_optimizer, palette_training_set,  # noqa: E402
                                 run_epoch)

config = dict(
    configurations="pixel_vqvae,pixel_vqvae_16x16,vqvae,vae",
    precisions="fp32,bf16",  # training precisions to time each configuration in
    batch_size=64,
    steps=6,  # batches in each timed pass
    repeats=5,  # timed passes; the median is reported, with the slowest and fastest
    warmup_steps=2,
    threads=0,  # torch's intra-op threads; 0 = torch's default for this machine
    device="auto",
    fast="auto",  # the training scripts' key: models/fast where 'auto' turns it on (the CPU), True or False
    distinct_blocks=True,  # on models/fast, VQ-VAEs run each distinct block once where it pays (models/fast/distinct.py)
    compile=False,  # time the model compiled by torch.compile (inductor), compilation in the warm-up
    prepare=False,  # also time `utils.data` preparing the whole set from the fetched source
    json="outputs/bench/throughput.json",
    worker="",  # internal: 'configuration:precision' measured in this process
)

# The Pixel VQ-VAE at a 16x16 code grid: the keys that differ from train_pixel_vqvae.py's.
PIXEL_VQVAE_16X16 = {"num_layers": 2, "num_embeddings": 1024, "embedding_dim": 64}
CONFIGURATIONS = {
    "pixel_vqvae": ("vqvae", train_pixel_vqvae.config),
    "pixel_vqvae_16x16": ("vqvae", {**train_pixel_vqvae.config, **PIXEL_VQVAE_16X16}),
    "vqvae": ("vqvae", train_vqvae.config),
    "vae": ("vae", train_vae.config),
    # Not in the default list: issue 20's 16x16 VQ-VAE choosing each pixel's colour from its palette.
    "palette_vqvae_16x16": ("vqvae", {**train_vqvae.config, **PIXEL_VQVAE_16X16, "palette_output": True}),
    # Not in the default list: the 16x16 tokenizer before its discriminator starts (its first 750
    # steps) and after, when each step also trains the discriminator.
    "tokenizer": ("vqvae", train_tokenizer.config),
    "tokenizer_adversarial": ("vqvae", {**train_tokenizer.config, "adversarial_start": 0}),
}
# Training images drawn per kept one for a palette model, which leaves out the noise backgrounds
# (half the prepared split) as training does.
PALETTE_DRAWS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEST_IMAGES = 3816  # the prepared test split's size; evaluation is timed over this many images
# The paper's reference implementation on a 2-core AVX-512 machine, batch 64 (from issue #6):
# images/s, peak memory in bytes, and the speed-up asked of this code.
REFERENCE = {
    "pixel_vqvae": (15, 3.9e9, 10),
    "pixel_vqvae_16x16": (27, 2.4e9, 3),
    "vqvae": (1830, 1.4e9, 3),
    "vae": (140, 1.6e9, 3),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def splits(image_size, train_count, test_count, seed):
    """(train, test) SpriteSets: the prepared Pokemon splits when present, else synthetic sprites."""
    prepared = DATA / "pokemon"
    if (prepared / "manifest.json").exists():
        train_path, test_path = (prepared / f"{split}_images.npy" for split in ("train", "test"))
        train_shape, test_shape = saved_shape(train_path), saved_shape(test_path)
        if train_shape[1] == image_size and train_shape[0] >= train_count and test_shape[0] >= test_count:
            # A random sample of the whole split, as training batches are: the split is stored
            # species by species, each sprite beside its flips and rotations, so its first images
            # repeat each other's blocks far more than a training batch does.
            chosen = np.sort(np.random.default_rng(seed).choice(train_shape[0], train_count, replace=False))
            return (sprite_set(read_rows(train_path, chosen)), sprite_set(read_rows(test_path, range(test_count))),
                    "prepared Pokemon splits")
    rng = np.random.default_rng(seed)

    def synthetic(count):
        palette = rng.integers(0, 256, (count, 8, 3), dtype=np.uint8)
        blocks = rng.integers(0, 8, (count, image_size // 4, image_size // 4))
        pixels = np.take_along_axis(palette, blocks.reshape(count, -1, 1), 1)
        images = pixels.reshape(count, image_size // 4, image_size // 4, 3).repeat(4, 1).repeat(4, 2)
        return sprite_set(images)

    return synthetic(train_count), synthetic(test_count), "synthetic palette sprites"


def _open_saved(file):
    """The shape and dtype of the .npy array in `file`, left at its first byte of data."""
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(file)
    if fortran_order:
        raise ValueError(f"{file.name} is saved in Fortran order")
    return shape, dtype


def saved_shape(path):
    with open(path, "rb") as file:
        return _open_saved(file)[0]


def read_rows(path, rows):
    """Rows of a saved array, one read each, so peak memory holds the model and not the split.

    Indexing a memory map of the split instead left 330 MB of its pages resident for 256 images
    of 12 KB: the kernel reads ahead around every row it faults in, and those pages count in the
    process's peak."""
    with open(path, "rb") as file:
        shape, dtype = _open_saved(file)
        start, row_bytes = file.tell(), int(np.prod(shape[1:])) * dtype.itemsize
        out = np.empty((len(rows), *shape[1:]), dtype)
        for i, row in enumerate(rows):
            file.seek(start + int(row) * row_bytes)
            file.readinto(memoryview(out[i]).cast("B"))
        return out


def sprite_set(images):
    images = np.array(images)
    return SpriteSet(images, np.ones(images.shape[:3], bool), [f"{i}.png" for i in range(len(images))])


def flops_per_image(model_type, run_config, model, device, batch=8):
    """Forward and backward FLOPs of one image, counted op by op on the reference model.

    These are the model's FLOPs: the fast path does somewhat more work (the fused stacks recompute
    their hidden layer in backward) or less (each distinct block once), on threads and in CPU
    kernels (models/fast/kernels.py) the counter does not see."""
    # Imported here, after the peak memory is read: a training run never loads it (0.1 GB).
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(batch, 3, run_config["image_size"], run_config["image_size"], device=device)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the counter sees only this thread
    try:
        with FlopCounterMode(display=False) as counter:
            model.loss_terms(x, model(x))["loss"].backward()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def peak_memory(device):
    """Peak bytes of this process: the CUDA allocator's, or the CPU's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # Linux's ru_maxrss of a child starts at its parent's peak (it survives fork and exec), and
    # the parent measured the ceilings with 0.5 GB of copies: VmHWM is this process's own.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(name, precision, cfg):
    """One configuration at one precision, in this process."""
    model_type, script_config = CONFIGURATIONS[name]
    device = choose_device(cfg["device"])
    run_config = {**script_config, "batch_size": cfg["batch_size"], "precision": precision, "epochs": 1,
                  "fast": cfg["fast"]}
    torch.manual_seed(run_config["seed"])
    batch = run_config["batch_size"]
    draws = PALETTE_DRAWS if run_config.get("palette_output") else 1
    train, _, source = splits(run_config["image_size"], batch * cfg["steps"] * draws, batch, run_config["seed"])
    train = palette_training_set(train, run_config).subset(batch * cfg["steps"])
    model = build_model(model_type, run_config).to(device, memory_format=torch.channels_last)
    runner = accelerated(model, run_config, device)
    if runner is not model and model_type == "vqvae" and not cfg["distinct_blocks"]:
        runner.run_distinct_blocks = False
    optimizer = make_optimizer(model, run_config, device)
    judge = make_discriminator_optimizer(model, run_config, device)
    timed = torch.compile(runner) if cfg["compile"] else runner
    run_epoch(timed, model_type, train.subset(batch * cfg["warmup_steps"]), run_config, device, 0, optimizer,
              discriminator_optimizer=judge)
    rates = []
    for repeat in range(cfg["repeats"]):
        synchronize(device)
        started = time.perf_counter()
        run_epoch(timed, model_type, train, run_config, device, repeat + 1, optimizer, discriminator_optimizer=judge)
        synchronize(device)
        rates.append(len(train) / (time.perf_counter() - started))
    train_peak = peak_memory(device)

    _, full_test, _ = splits(run_config["image_size"], batch, TEST_IMAGES, run_config["seed"])
    synchronize(device)
    started = time.perf_counter()
    run_epoch(timed, model_type, full_test, run_config, device, 0)
    synchronize(device)
    eval_rate = len(full_test) / (time.perf_counter() - started)
    return {"configuration": name, "precision": precision, "device": str(device), "images": source,
            "threads": torch.get_num_threads(), "batch_size": batch, "images_per_second": statistics.median(rates),
            "images_per_second_min": min(rates), "images_per_second_max": max(rates),
            "flops_per_image": flops_per_image(model_type, run_config, model, device),
            "peak_memory_bytes": train_peak, "eval_images": len(full_test), "eval_images_per_second": eval_rate,
            "distinct_block_share": distinct_share(model, train, batch) if model_type == "vqvae" else None,
            "fast": runner is not model, "cpu_kernels": runner is not model and device.type == "cpu" and kernels.available()}


def distinct_share(model, sprites, batch):
    """Mean share of a batch's blocks that are distinct: the work left when each is run once."""
    side = 2 ** model.num_layers
    shares = []
    for start in range(0, len(sprites) - batch + 1, batch):
        x = to_batch(sprites.images[start:start + batch], torch.device("cpu"))
        found = distinct_blocks(x, side)
        blocks = len(x) * (x.shape[2] // side) * (x.shape[3] // side)
        distinct = blocks if found is None else int((found[1].counts > 0).sum())
        shares.append(distinct / blocks)
    return statistics.mean(shares)


def matmul_rate(device, dtype, size=2048, seconds=1.0):
    """FLOP/s of square matrix products, the best of a second's worth."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def copy_bandwidth(device, megabytes=256, repeats=5):
    """Bytes per second of a large tensor copy, reads and writes both counted."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = max(best, 2 * source.numel() * 4 / (time.perf_counter() - started))
    return best


def time_preparation(image_size):
    """Seconds to prepare the whole set from the fetched source (fetching it first if needed)."""
    fetch_pokemon()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        prepare(None, Path(tmp) / "pokemon", PrepareOptions(image_size=image_size), log=lambda _: None)
        return time.perf_counter() - started


def table(results, ceilings):
    lines = [f"{'configuration':<20} {'prec':<5} {'images/s':>9} {'spread':>13} {'x ref':>6} {'goal':>5} "
             f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'ceiling':>8} {'peak GB':>8} {'ref GB':>6} {'eval img/s':>10} {'distinct':>8}"]
    for r in results:
        reference_rate, reference_memory, goal = REFERENCE.get(r["configuration"], (float("nan"), float("nan"), 0))
        achieved = r["flops_per_image"] * r["images_per_second"]
        ceiling = ceilings[f"{r['device']}:{r['precision']}_matmul_flops"]
        spread = f"{r['images_per_second_min']:.1f}-{r['images_per_second_max']:.1f}"
        distinct = "-" if r["distinct_block_share"] is None else f"{r['distinct_block_share']:.0%}"
        lines.append(f"{r['configuration']:<20} {r['precision']:<5} {r['images_per_second']:9.1f} {spread:>13} "
                     f"{r['images_per_second'] / reference_rate:5.1f}x {goal:4d}x {r['flops_per_image'] / 1e9:9.2f} "
                     f"{achieved / 1e9:8.1f} {achieved / ceiling:7.1%} {r['peak_memory_bytes'] / 1e9:8.2f} "
                     f"{reference_memory / 1e9:6.1f} {r['eval_images_per_second']:10.0f} {distinct:>8}")
    return "\n".join(lines)


def main(argv):
    cfg = parse_config(config, argv)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["worker"]:
        name, precision = cfg["worker"].split(":")
        print(json.dumps(measure(name, precision, cfg)))
        return
    device = choose_device(cfg["device"])
    precisions = cfg["precisions"].split(",")
    if "bf16" in precisions and device.type == "cpu" and not cpu_has_bfloat16():
        # One bf16 step of the 16x16 model would take minutes in the scalar fallback.
        precisions.remove("bf16")
        print("bf16 skipped: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)", flush=True)
    ceilings = {f"{device}:{p}_matmul_flops": matmul_rate(device, DTYPES[p]) for p in precisions}
    ceilings[f"{device}:copy_bytes_per_second"] = copy_bandwidth(device)
    rates = ", ".join(f"{ceilings[f'{device}:{p}_matmul_flops'] / 1e9:.0f} GFLOP/s {p}" for p in precisions)
    kernels_used = "" if device.type != "cpu" else "; CPU kernels " + ("on" if kernels.available() else "off (torch's ops)")
    print(f"{device} ({describe_machine(device)}), {torch.get_num_threads()} threads: matrix multiply {rates}; copy "
          f"{ceilings[f'{device}:copy_bytes_per_second'] / 1e9:.1f} GB/s (read + write){kernels_used}", flush=True)
    passed = [f"--{key}={cfg[key]}" for key in ("batch_size", "steps", "repeats", "warmup_steps", "threads",
                                                 "device", "fast", "distinct_blocks", "compile")]
    results = []
    for name in cfg["configurations"].split(","):
        if name not in CONFIGURATIONS:
            sys.exit(f"error: unknown configuration {name!r}; expected some of {', '.join(CONFIGURATIONS)}")
        for precision in precisions:
            done = subprocess.run([sys.executable, __file__, f"--worker={name}:{precision}", *passed],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"error: {name} at {precision} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {name} {precision}: {results[-1]['images_per_second']:.1f} images/s "
                  f"({results[-1]['images']})", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": describe_machine(device), "settings": cfg,
              "ceilings": ceilings, "results": results}
    if cfg["prepare"]:
        report["prepare_seconds"] = time_preparation(train_pixel_vqvae.config["image_size"])
    print(table(results, ceilings))
    if "prepare_seconds" in report:
        print(f"preparing the full data set: {report['prepare_seconds']:.1f} s")
    write_json(ROOT / cfg["json"], report)
    print(f"written to {cfg['json']}")


if __name__ == "__main__":
    main(sys.argv[1:])
