"""Test-set quality of each configuration trained at each precision, paired by seed.

    python bench/quality.py --configurations=vae --seeds=1,2,3            # fp32 against bf16
    python bench/quality.py --configurations=vqvae --precisions=fp32 --epochs=2

Each run is the configuration's own training script with a seed, a precision and the epochs and
training images given here (everything else its defaults), written under `output_dir`; this
reads back its `metrics.json`. For every metric it prints the mean and the seed-to-seed spread
per precision, and the difference of each other precision from the first, seed by seed: a
switch that changes numerics (bfloat16 autocast) is on by default only where these hold.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.throughput import PIXEL_VQVAE_16X16  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.io import write_json  # noqa: E402

config = dict(
    configurations="vae",
    precisions="fp32,bf16",  # the first is the baseline the others are compared with
    seeds="1,2,3",
    epochs=1,
    max_train_images=0,  # 0 = the whole training split
    output_dir="outputs/bench/quality",
    json="outputs/bench/quality.json",
)

# Each configuration of bench/throughput.py as its training script and the keys that differ.
SCRIPTS = {
    "pixel_vqvae": ("train_pixel_vqvae.py", {}),
    "pixel_vqvae_16x16": ("train_pixel_vqvae.py", PIXEL_VQVAE_16X16),
    "vqvae": ("train_vqvae.py", {}),
    "vae": ("train_vae.py", {}),
}
# Higher is better for every metric but the MSE.
METRICS = ("mse", "ssim", "psnr", "exact_pixel_rate", "sprite_exact_pixel_rate", "codes_used")


def train(name, precision, seed, cfg):
    """Train one run and return its metrics.json."""
    script, overrides = SCRIPTS[name]
    experiment = f"{name}_{precision}_seed{seed}"
    keys = {**overrides, "experiment_name": experiment, "output_dir": cfg["output_dir"], "precision": precision,
            "seed": seed, "epochs": cfg["epochs"], "max_train_images": cfg["max_train_images"], "overwrite": True}
    done = subprocess.run([sys.executable, script, *(f"--{key}={value}" for key, value in keys.items())],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {experiment} failed:\n{done.stderr[-3000:]}")
    return json.loads((ROOT / cfg["output_dir"] / experiment / "metrics.json").read_text())


def summary(runs, precisions, seeds):
    """Per metric: mean and spread per precision, and each precision's seed-paired difference."""
    lines = [f"{'metric':<24} " + " ".join(f"{p + ' mean (min-max)':>34}" for p in precisions)
             + "".join(f" {p + ' - ' + precisions[0] + ' (min-max)':>40}" for p in precisions[1:])]
    for metric in METRICS:
        if metric not in runs[precisions[0]][0]:
            continue
        values = {p: [run[metric] for run in runs[p]] for p in precisions}
        cells = [f"{statistics.mean(v):.6g} ({min(v):.6g}-{max(v):.6g})" for v in values.values()]
        differences = [[b - a for a, b in zip(values[precisions[0]], values[p])] for p in precisions[1:]]
        lines.append(f"{metric:<24} " + " ".join(f"{c:>34}" for c in cells)
                     + "".join(f" {f'{statistics.mean(d):+.4g} ({min(d):+.4g} to {max(d):+.4g})':>40}"
                               for d in differences))
    seconds = {p: statistics.mean(run["train_images_per_second"] for run in runs[p]) for p in precisions}
    lines.append(f"{'training images/s':<24} " + " ".join(f"{seconds[p]:>34.1f}" for p in precisions))
    lines.append(f"seeds {', '.join(map(str, seeds))}")
    return "\n".join(lines)


def main(argv):
    cfg = parse_config(config, argv)
    precisions, seeds = cfg["precisions"].split(","), [int(s) for s in cfg["seeds"].split(",")]
    report = {"settings": cfg, "results": {}}
    for name in cfg["configurations"].split(","):
        if name not in SCRIPTS:
            sys.exit(f"error: unknown configuration {name!r}; expected some of {', '.join(SCRIPTS)}")
        runs = {p: [] for p in precisions}
        for seed in seeds:
            for precision in precisions:
                runs[precision].append(train(name, precision, seed, cfg))
                print(f"  {name} {precision} seed {seed}: " + ", ".join(
                    f"{m} {runs[precision][-1][m]:.6g}" for m in METRICS if m in runs[precision][-1]), flush=True)
        report["results"][name] = runs
        print(f"{name}, {cfg['epochs']} epoch(s) of {cfg['max_train_images'] or 'all'} training images:")
        print(summary(runs, precisions, seeds), flush=True)
    write_json(ROOT / cfg["json"], report)
    print(f"written to {cfg['json']}")


if __name__ == "__main__":
    main(sys.argv[1:])
