"""The throughput benchmark runs end to end and reports what it measured (the figures themselves
are bench/README.md's, measured on an idle machine, not here)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_writes_one_row_per_configuration_and_precision(tmp_path):
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, "bench/throughput.py", "--configurations=vqvae", "--precisions=fp32",
                           "--steps=1", "--repeats=1", "--warmup_steps=1", f"--json={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert (row["configuration"], row["precision"], row["batch_size"]) == ("vqvae", "fp32", 64)
    assert row["images_per_second_min"] <= row["images_per_second"] <= row["images_per_second_max"]
    assert row["images_per_second"] > 0 and row["eval_images_per_second"] > 0
    assert row["flops_per_image"] > 0 and row["peak_memory_bytes"] > 0
    # Padding blocks (models/distinct.py) are not distinct blocks of the batch.
    assert 0 < row["distinct_block_share"] <= 1
    (matmul,) = [rate for key, rate in report["ceilings"].items() if key.endswith(":fp32_matmul_flops")]
    assert matmul > 0
    assert any(line.startswith("vqvae ") and "fp32" in line for line in done.stdout.splitlines())
