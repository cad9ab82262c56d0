"""The checks a CUDA machine is for, in one command that ends within 8 minutes and writes one JSON.

    bench/gpu_check.sh                                     # on the CUDA machine (picks the Python)
    python bench/gpu_check.py --device=cpu --tiny=True --json=/tmp/rehearsal.json   # the same steps, tiny, on the CPU

Steps, each in processes of their own, the JSON rewritten after each so that a killed check keeps
what ran, and each cut short when the time left (`budget_seconds`) runs out:
1. the environment: Python, torch, the GPU, and any module of requirements.txt that is missing
   (no step runs without them: this machine may have no network to install them from);
2. data: synthetic sprites (tests/sprites.py) prepared by `python -m utils.data prepare --source`,
   for the Pokemon sprites come from npm, which such a machine may not reach;
3. collectives: a one-process torchrun group with the training scripts' backends (NCCL for CUDA
   tensors, gloo for the rest) carrying an all-reduce and an object gather;
4. tests: `pytest tests/test_cuda.py` on the device;
5. one short epoch of each configuration of bench/throughput.py through its training script, on
   the reference path and, where the scripts have a `fast` key, on the fast one: images/s and the
   test metrics, and fast against reference;
6. the default script under a one-process torchrun, against its plain run.
"""
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.config import parse_config  # noqa: E402
from utils.errors import UserError, exit_on_user_error  # noqa: E402
from utils.io import write_json  # noqa: E402

config = dict(
    device="cuda",
    tiny=False,  # tiny images and models: the CPU rehearsal of the same steps
    configurations="pixel_vqvae,pixel_vqvae_16x16,vqvae,vae",  # of bench/throughput.py, each one short epoch
    budget_seconds=460,  # the whole check; each step gets what is left
    json="",  # '' = bench/results/gpu-<date>.json
    species=160,  # synthetic species, 4 sprites each (tiny: 20, 2 each)
    max_train_images=4096,  # the short epoch (tiny: 32)
    batch_size=64,  # (tiny: 8)
    worker="",  # internal: 'collectives' is the process torchrun starts
)

# What the training scripts import (requirements.txt), by module name.
REQUIRED_MODULES = ("torch", "torchvision", "numpy", "PIL", "matplotlib", "tqdm", "pytorch_fid", "skimage",
                    "scipy", "pytest")
SCRIPTS = {"pixel_vqvae": "train_pixel_vqvae.py", "pixel_vqvae_16x16": "train_pixel_vqvae.py",
           "vqvae": "train_vqvae.py", "vae": "train_vae.py"}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
METRICS = ("mse", "ssim", "psnr", "exact_pixel_rate", "codes_used", "train_seconds", "train_images_per_second")


class Clock:
    """The time left of the budget, shared by the steps."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds

    def left(self):
        return self.deadline - time.monotonic()


def environment(device):
    found = {name: importlib.util.find_spec(name) is not None for name in REQUIRED_MODULES}
    report = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
              "missing_modules": [name for name, here in found.items() if not here]}
    if found["torch"]:
        import torch
        report.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
        if device == "cuda" and not torch.cuda.is_available():
            report["error"] = (f"CUDA is not available here (torch {torch.__version__}, built for CUDA "
                               f"{torch.version.cuda}); --device=cpu --tiny=True rehearses the steps on the CPU")
    if report["missing_modules"]:
        report["error"] = (f"missing Python modules {', '.join(report['missing_modules'])}: run "
                           f"bench/gpu_check.sh, or pip install -r requirements-dev.txt where PyPI is reachable")
    return report


def run(command, clock, limit=None, env=None):
    """A subprocess within the time left: (return code or 'timeout', stdout, stderr, seconds)."""
    seconds = max(1.0, min(clock.left(), limit or clock.left()))
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env={**os.environ, **(env or {})})
        outcome = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        outcome = "timeout", stopped.stdout or "", stopped.stderr or ""
    outcome = tuple(part.decode() if isinstance(part, bytes) else part for part in outcome)
    return (*outcome, round(time.monotonic() - started, 1))


def step_record(code, stdout, stderr, seconds):
    record = {"returncode": code, "seconds": seconds}
    if code != 0:
        record["output_tail"] = (stdout + stderr)[-2000:]
    return record


def prepare_sprites(work, options, clock):
    from tests.sprites import write_species_folders
    species, per_species = (20, 2) if options["tiny"] else (options["species"], 4)
    write_species_folders(work / "sprites", species=species, per_species=per_species)
    image_size = 16 if options["tiny"] else 64
    command = [sys.executable, "-m", "utils.data", "prepare", "--source", str(work / "sprites"),
               "--out", str(work / "data"), "--image-size", str(image_size)]
    if options["tiny"]:
        command += ["--rotations", "15"]
    record = step_record(*run(command, clock, limit=180))
    record.update(source="synthetic sprites of tests/sprites.py, prepared by utils.data: the Pokemon "
                         "sprites come from npm, which this machine may not reach",
                  species=species, sprites=species * per_species, image_size=image_size)
    if record["returncode"] == 0:
        for split in ("train", "test"):
            record[f"{split}_images"] = len(json.loads((work / "data" / f"{split}_names.json").read_text()))
    return record


def training_command(name, options, data_dir, output_dir, experiment):
    script = SCRIPTS[name]
    command = [script, f"--dataset={data_dir}", f"--output_dir={output_dir}", f"--experiment_name={experiment}",
               "--epochs=1", f"--device={options['device']}", "--num_fusions=2", "--fusion_steps=3"]
    if name == "pixel_vqvae_16x16":
        from bench.throughput import PIXEL_VQVAE_16X16
        command += [f"--{key}={value}" for key, value in PIXEL_VQVAE_16X16.items()]
    if options["tiny"]:
        from tests.helpers import TINY  # the test suite's tiny models
        command += ["--image_size=16", "--batch_size=8", "--max_train_images=32", *TINY[script]]
    else:
        command += [f"--batch_size={options['batch_size']}", f"--max_train_images={options['max_train_images']}"]
    return command


def lists_key(script, key):
    """Whether `script --help` lists config key `key`: the scripts of this tree may lack it."""
    usage = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return usage.returncode == 0 and f"--{key} " in usage.stdout


def training_run(command, output_dir, experiment, clock, launcher=(sys.executable,), env=None):
    code, stdout, stderr, seconds = run([*launcher, *command], clock, limit=240, env=env)
    record = step_record(code, stdout, stderr, seconds)
    record["warnings"] = [line for line in stderr.splitlines() if "warn" in line.lower()][:10]
    metrics_file = output_dir / experiment / "metrics.json"
    if code == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        record["metrics"] = {key: metrics[key] for key in METRICS if key in metrics}
        record["device"] = metrics.get("device")
    return record


def describe(label, record):
    if "metrics" not in record:
        return f"{label}: failed ({record['returncode']}) after {record['seconds']} s"
    m = record["metrics"]
    codes = f", {m['codes_used']} codes" if "codes_used" in m else ""
    return (f"{label}: {m['train_images_per_second']:.1f} images/s, test MSE {m['mse']:.5f}, SSIM {m['ssim']:.4f}"
            f"{codes} ({record['seconds']} s)")


def compared(fast, reference):
    """Fast against reference: the speed-up and how far the test metrics moved."""
    if "metrics" not in fast or "metrics" not in reference:
        return None
    f, r = fast["metrics"], reference["metrics"]
    return {"speedup": f["train_images_per_second"] / r["train_images_per_second"],
            "mse_relative_difference": (f["mse"] - r["mse"]) / r["mse"], "ssim_difference": f["ssim"] - r["ssim"]}


def collectives_worker(device):
    """Run by torchrun: the backends utils/distributed.py asks for, carrying one of each exchange."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo")
    on = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device == "cuda" else torch.device("cpu")
    values = torch.arange(4.0, device=on)
    dist.all_reduce(values)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    dist.barrier()
    print(json.dumps({"backend": str(dist.get_backend()), "all_reduce": values.tolist(), "gathered": gathered,
                      "world_size": dist.get_world_size()}))
    dist.destroy_process_group()


def check(options):
    started = time.monotonic()
    clock = Clock(options["budget_seconds"])
    default = (ROOT / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}.json" if options["device"] == "cuda"
               else ROOT / "outputs" / "bench" / "gpu_check_cpu.json")
    out = Path(options["json"] or default)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "settings": options}

    def save(line=None):
        report["elapsed_seconds"] = round(time.monotonic() - started, 1)
        write_json(out, report)
        if line:
            print(line, flush=True)

    report["environment"] = environment(options["device"])
    save(f"environment: {json.dumps(report['environment'])}")
    if "error" in report["environment"]:
        raise UserError(f"{report['environment']['error']} (written to {out})")

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temp:
        work = Path(temp)
        report["data"] = prepare_sprites(work, options, clock)
        save(f"data: {report['data'].get('train_images')} training and {report['data'].get('test_images')} "
             f"test images of synthetic sprites ({report['data']['seconds']} s)")
        if report["data"]["returncode"] != 0:
            raise UserError(f"preparing the synthetic sprites failed; see {out}")

        code, stdout, stderr, seconds = run([*TORCHRUN, "bench/gpu_check.py", "--worker=collectives",
                                             f"--device={options['device']}"], clock, limit=120)
        report["collectives"] = step_record(code, stdout, stderr, seconds)
        if code == 0:
            report["collectives"].update(json.loads(stdout.strip().splitlines()[-1]))
        save(f"collectives under torchrun: {report['collectives'].get('backend', 'failed')} "
             f"({report['collectives']['seconds']} s)")

        code, stdout, stderr, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             "tests/test_cuda.py"], clock, limit=240,
                                            env={"PIXEL_VQVAE_TEST_DEVICE": options["device"]})
        report["tests"] = step_record(code, stdout, stderr, seconds)
        report["tests"]["summary"] = (stdout.strip().splitlines() or [""])[-1]
        save(f"tests/test_cuda.py on {options['device']}: {report['tests']['summary']}")

        report["runs"], report["fast_against_reference"], report["fast_key"] = {}, {}, {}
        outputs = work / "outputs"
        for name in options["configurations"].split(","):
            script = SCRIPTS[name]
            fast = report["fast_key"][script] = lists_key(script, "fast")
            paths = {"reference": ["--fast=False"], "fast": ["--fast=True"]} if fast else {"reference": []}
            for path, extra in paths.items():
                experiment = f"{name}_{path}"
                command = training_command(name, options, work / "data", outputs, experiment) + extra
                record = training_run(command, outputs, experiment, clock)
                report["runs"][experiment] = record
                save(describe(f"{name}, {path}", record))
            if fast:
                report["fast_against_reference"][name] = compared(report["runs"][f"{name}_fast"],
                                                                  report["runs"][f"{name}_reference"])

        command = training_command("pixel_vqvae", options, work / "data", outputs, "pixel_vqvae_torchrun")
        command += ["--fast=False"] if report["fast_key"]["train_pixel_vqvae.py"] else []
        record = training_run(command, outputs, "pixel_vqvae_torchrun", clock, launcher=TORCHRUN)
        plain = report["runs"]["pixel_vqvae_reference"].get("metrics")
        if plain and "metrics" in record:
            record["mse_relative_difference_from_plain_run"] = (record["metrics"]["mse"] - plain["mse"]) / plain["mse"]
        # utils/distributed.py starts no process group for a world of one, so this run takes the
        # single-process path; the collectives step above is the one that exercises NCCL.
        record["note"] = "WORLD_SIZE=1 runs the single-process path; see 'collectives' for NCCL"
        report["torchrun"] = record
        save(describe("pixel_vqvae under a one-process torchrun", record))

    failed = [step for step in ("collectives", "tests", "torchrun") if report[step]["returncode"] != 0]
    failed += [name for name, record in report["runs"].items() if record["returncode"] != 0]
    report["failed"] = failed
    save(f"{'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}; "
         f"{report['elapsed_seconds']} s; written to {out}")
    return 1 if failed else 0


def main(argv):
    options = parse_config(config, argv)
    if options["worker"] == "collectives":
        return collectives_worker(options["device"])
    if options["worker"]:
        raise UserError(f"--worker takes '' or 'collectives', got {options['worker']!r}")
    if options["device"] not in ("cuda", "cpu"):
        raise UserError(f"--device takes cuda or cpu, got {options['device']!r}")
    unknown = set(options["configurations"].split(",")) - set(SCRIPTS)
    if unknown or "pixel_vqvae" not in options["configurations"].split(","):
        raise UserError(f"--configurations takes a comma list of {', '.join(SCRIPTS)}, pixel_vqvae among them "
                        f"(the torchrun step compares with its run), got {options['configurations']!r}")
    return check(options)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(lambda: main(sys.argv[1:])))
