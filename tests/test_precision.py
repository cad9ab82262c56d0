"""The `precision` key: bfloat16 autocast in training steps, float32 everywhere else."""
import json

import pytest
import torch

from models.fast.threads import cpu_has_bfloat16
from tests.helpers import train


def test_a_bfloat16_run_trains_and_differs_from_float32_only_by_rounding(tmp_path, tiny_data):
    runs = {}
    for precision in ("fp32", "bf16"):
        done = train("train_vqvae.py", tmp_path, tiny_data, f"--precision={precision}", name=precision)
        assert done.returncode == 0, done.stderr[-3000:]
        # A CPU without bfloat16 instructions runs it in scalar code: the user is told so.
        warned = "this CPU has no bfloat16 instructions" in done.stderr
        assert warned == (precision == "bf16" and not cpu_has_bfloat16())
        runs[precision] = torch.load(tmp_path / precision / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(runs["fp32"][k], runs["bf16"][k]) for k in runs["fp32"])
    metrics = {p: json.loads((tmp_path / p / "metrics.json").read_text()) for p in runs}
    # Evaluation runs in float32 either way; two epochs of tiny training land close together.
    assert metrics["bf16"]["mse"] == pytest.approx(metrics["fp32"]["mse"], rel=0.5)


def test_an_unknown_precision_is_refused_in_one_line(tmp_path, tiny_data):
    done = train("train_vqvae.py", tmp_path, tiny_data, "--precision=fp16")
    assert done.returncode == 2
    assert "--precision must be one of fp32, bf16, got 'fp16'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
