"""Two processes of batch b against one process of batch 2b, through the training scripts' own
command lines: the weights' largest difference, the test metrics of both, and the wall time.

    nice -n 19 python bench/distributed.py --dataset=PREPARED_FOLDER --image_size=16
    nice -n 19 python bench/distributed.py --script=train_vae.py --epochs=1 -- --max_filters=64

Every key after `--` goes to both training runs unchanged. The two processes run on the CPU with
gloo, one thread each, and the single process gets `threads` (two: the same cores). Outputs go to a temporary folder that is removed afterwards.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.config import parse_config  # noqa: E402

config = dict(
    script="train_pixel_vqvae.py",
    dataset="pokemon",
    image_size=64,
    batch_size=32,  # per process; the single process takes twice this
    epochs=2,
    max_train_images=0,  # 0 = all
    threads=2,  # of the one process; each of the two has one
)
METRICS = ["mse", "ssim", "psnr", "exact_pixel_rate", "codes_used", "perplexity"]


def run(command, threads):
    """Seconds the command took; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv):
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    cfg = parse_config(config, own)
    with tempfile.TemporaryDirectory() as out:
        common = [cfg["script"], f"--dataset={cfg['dataset']}", f"--image_size={cfg['image_size']}",
                  f"--epochs={cfg['epochs']}", f"--max_train_images={cfg['max_train_images']}",
                  f"--output_dir={out}", "--device=cpu", *passed]
        seconds_one = run([sys.executable, *common, "--experiment_name=one",
                           f"--batch_size={2 * cfg['batch_size']}"], threads=cfg["threads"])
        seconds_two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *common, "--experiment_name=two", f"--batch_size={cfg['batch_size']}"], threads=1)
        folders = Path(out) / "one", Path(out) / "two"
        weights = [torch.load(folder / "model.pt", weights_only=True)["model"] for folder in folders]
        metrics = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    gaps = {key: (weights[0][key].double() - weights[1][key].double()).abs().max().item()
            for key in weights[0] if weights[0][key].is_floating_point()}
    print(f"{cfg['script']}, {cfg['epochs']} epochs, 1 x {2 * cfg['batch_size']} ({cfg['threads']} threads) "
          f"against 2 x {cfg['batch_size']} (1 thread each)")
    # Parameters learn by gradient; buffers (codebook, BatchNorm statistics) by their own updates.
    for kind, keys in [("parameter", [k for k in gaps if k.endswith((".weight", ".bias"))]),
                       ("buffer", [k for k in gaps if not k.endswith((".weight", ".bias"))])]:
        widest = max(keys, key=gaps.get)
        print(f"  largest {kind} difference {gaps[widest]:.3g} ({widest}, whose largest value is "
              f"{weights[0][widest].abs().max().item():.3g})")
    print(f"  {'':<20s} {'one process':>14s} {'two processes':>14s}")
    for key in [k for k in METRICS if k in metrics[0]] + ["train_seconds"]:
        print(f"  {key:<20s} {metrics[0][key]:>14.6g} {metrics[1][key]:>14.6g}")
    print(f"  {'wall seconds':<20s} {seconds_one:>14.1f} {seconds_two:>14.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
