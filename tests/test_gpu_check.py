"""bench/gpu_check.py, rehearsed on the CPU in tiny form: every step of the CUDA check runs and
lands in its JSON (the CUDA figures themselves are bench/README.md's, from a GPU machine)."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


def gpu_check(*args):
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)


def test_the_cpu_rehearsal_runs_every_step_and_writes_them_to_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    # A budget for a busy machine: this test checks the steps, not the 8 minutes of the CUDA check.
    done = gpu_check("--device=cpu", "--tiny=True", "--configurations=pixel_vqvae", "--budget_seconds=1500",
                     f"--json={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    assert report["data"]["source"].startswith("synthetic sprites")
    assert report["data"]["train_images"] > 0 and report["data"]["test_images"] > 0
    collectives = report["collectives"]
    assert (collectives["backend"], collectives["world_size"]) == ("gloo", 1)
    assert collectives["all_reduce"] == [0.0, 1.0, 2.0, 3.0] and collectives["gathered"] == [{"rank": 0}]
    assert report["tests"]["returncode"] == 0 and " passed" in report["tests"]["summary"]
    plain = report["runs"]["pixel_vqvae_reference"]
    assert plain["device"] == "cpu" and plain["metrics"]["train_images_per_second"] > 0
    assert 0 < plain["metrics"]["mse"] < 1
    # A world of one under torchrun trains what the plain process trains, bit for bit on the CPU.
    assert report["torchrun"]["metrics"]["mse"] == plain["metrics"]["mse"]
    assert "all steps passed" in done.stdout.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_where_there_is_none_is_one_error_line_and_a_json_saying_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = gpu_check(f"--json={out}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: CUDA is not available here")
    assert json.loads(out.read_text())["environment"]["cuda_available"] is False


def test_an_unknown_configuration_is_refused_before_any_work(tmp_path):
    done = gpu_check("--device=cpu", "--configurations=pixel_vqvae,vqvae2", f"--json={tmp_path / 'x.json'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --configurations takes a comma list of")
    assert not (tmp_path / "x.json").exists()
