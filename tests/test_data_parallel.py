"""Data-parallel training: N processes of batch b train and evaluate as one process of batch N*b.

Two gloo processes on the CPU stand in for two GPUs. Their results agree with one process to float
rounding, not bit for bit: the same sums are added in another order (per rank, then across ranks).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train_pixel_vqvae
import train_vae
import train_vqvae
from models import build_model
from models.batchnorm import convert_sync_batchnorm
from tests.helpers import ROOT, TINY, train, train_command
from utils import data_parallel as data_parallel_module
from utils.config import parse_config
from utils.data.load import load_split
from models.collectives import all_gather_rows
from utils.data_parallel import agreed, batch_shares, data_parallel
from utils.errors import UserError
from utils.metrics import image_metrics
from utils.training.fast_path import accelerated
from utils.training.loop import run_epoch, seed_everything

BATCH = 8  # per process; one process takes 2 * BATCH
TRAIN_IMAGES = 43  # global batches of 16, 16 and 11, whose last splits unevenly, 5 and 6
TEST_IMAGES = 21  # evaluation batches of 16 and 5
SGD_LEARNING_RATE = 0.5  # steps of about 1e-2 on these weights
# Float32 sums in another order leave about 5e-6 of a tensor's largest value between one process
# and two after these steps; BatchNorm statistics of each process's batch alone leave 1e-3 or more.
SCALE_TOLERANCE = 3e-5
CPU = torch.device("cpu")
# The scripts' own config blocks on tiny settings: the default Pixel VQ-VAE (k-means and dead-code
# restarts on), the VQ-VAE with the SSIM term, the VAE; every one with SyncBatchNorm.
CASES = {
    "pixel_vqvae": ("vqvae", train_pixel_vqvae.config, TINY["train_pixel_vqvae.py"]),
    "vqvae_ssim": ("vqvae", train_vqvae.config, TINY["train_vqvae.py"] + ["--use_ssim_loss=True"]),
    "vae": ("vae", train_vae.config, TINY["train_vae.py"]),
    # Restarts every step, so that rank 0's choice of new codes must reach every rank.
    "restarting_codes": ("vqvae", train_pixel_vqvae.config, TINY["train_pixel_vqvae.py"] + ["--dead_code_threshold=0.999"]),
    # Each level's EMA codebook, k-means and restarts reduced over the ranks, on the residuals.
    "residual": ("vqvae", train_vqvae.config, TINY["train_vqvae.py"] + ["--quantizer=residual", "--residual_depth=2"]),
    # No codebook: its projections are weights, averaged as every other weight is. Three odd levels:
    # with 4,4 the untrained model rounds every latent to one of two codes, and the decoder's
    # BatchNorm of a two-valued input makes the gradient of the layer before it float rounding alone.
    "fsq": ("vqvae", train_vqvae.config, TINY["train_vqvae.py"] + ["--quantizer=fsq", "--num_embeddings=125", "--fsq_levels=5,5,5"]),
}
# What each VQ case's quantiser learns, to show that equal ranks were kept equal, not left alone.
LEARNT = {"residual": ["quantizer.quantizers.0.embed_sum", "quantizer.quantizers.1.embed_sum"],
          "fsq": ["quantizer.project_in.weight"]}


def case_config(name, batch_size):
    _, defaults, tiny = CASES[name]
    return parse_config(defaults, tiny + ["--image_size=16", f"--batch_size={batch_size}", "--learning_rate=0.003"])


def trained_and_evaluated(name, data_dir, batch_size):
    """One training epoch, then the test set: rank 0's state and what every rank computed."""
    model_type = CASES[name][0]
    config = case_config(name, batch_size)
    train_set = load_split(data_dir, "train").subset(TRAIN_IMAGES)
    test_set = load_split(data_dir, "test").subset(TEST_IMAGES)
    seed_everything(config["seed"])
    model = build_model(model_type, config).to(memory_format=torch.channels_last)
    # Plain SGD: Adam's first step is lr * g / |g|, which turns a gradient that is zero up to rounding
    # (the encoder's last bias, after k-means, ahead of the decoder's BatchNorm) into +-lr.
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LEARNING_RATE)
    # As the scripts train: on models/fast (config key fast="auto" on the CPU), data-parallel.
    trained = data_parallel(accelerated(model, config, CPU), CPU, config["sync_batchnorm"])
    run_epoch(trained, model_type, train_set, config, CPU, 0, optimizer)
    # Taken before any evaluation makes the buffers rank 0's, so that ranks can be compared.
    state = {key: value.clone() for key, value in model.state_dict().items()}
    means, codes, reconstructions = run_epoch(model, model_type, test_set, config, CPU, 1, keep_outputs=True)
    return {"state": state, "means": means, "codes": codes, "reconstructions": reconstructions}


def assert_close_to_scale(actual, expected, name, absolute=1e-7):
    if expected.is_floating_point():
        gap = (actual.double() - expected.double()).abs().max().item()
        assert gap <= SCALE_TOLERANCE * expected.abs().max().item() + absolute, f"{name}: {gap:.3g} apart"
    else:
        assert torch.equal(actual, expected), name


def batch_norm_share(rank, world):
    """SyncBatchNorm2d on this rank's half of a seeded batch: output, gradients, running stats."""
    torch.manual_seed(0)
    x = (torch.randn(6, 4, 3, 3) * 2 + 1).chunk(world)[rank].requires_grad_()
    weights = torch.randn(6, 4, 3, 3).chunk(world)[rank]
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    out = bn(x)
    (out * weights).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


def collectives(rank):
    """What `agreed` and `all_gather_rows` give this rank."""
    sent = agreed(lambda: f"read on rank {rank}", first_rank_only=True)

    def fail_on_rank_1():
        if rank == 1:
            raise UserError("no data here")

    try:
        agreed(fail_on_rank_1)
        raised = None
    except UserError as err:
        raised = str(err)
    return {"sent": sent, "raised": raised, "rows": all_gather_rows(torch.full((rank + 1, 2), rank))}


def run_rank(rank, world, port, data_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: trained_and_evaluated(name, data_dir, BATCH) for name in CASES}
        results["batch_norm"] = batch_norm_share(rank, world)
        results["collectives"] = collectives(rank)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_data):
    """What each of two gloo processes of batch BATCH computed, [rank 0, rank 1]."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(run_rank, args=(2, free_port(), tiny_data, out), nprocs=2)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def one_process(tiny_data):
    """The same, computed by this one process with batch 2 * BATCH."""
    return {name: trained_and_evaluated(name, tiny_data, 2 * BATCH) for name in CASES}


def test_ranks_take_their_slice_of_each_global_batch_and_split_the_last_evenly(monkeypatch):
    order = np.arange(100, 122)  # 22 images: global batches of 8, the last of 6
    monkeypatch.setattr(data_parallel_module, "world_size", lambda: 3)
    shares = {}
    for rank in range(3):
        monkeypatch.setattr(data_parallel_module, "rank", lambda rank=rank: rank)
        shares[rank] = [(index.tolist(), start, size) for index, start, size in batch_shares(order, 3, True)]
    # Each process takes `batch_size` of the global batch of 3 * 3 = 9; the last 4 go 1, 1, 2.
    assert shares[0] == [([100, 101, 102], 0, 9), ([109, 110, 111], 0, 9), ([118], 0, 4)]
    assert shares[1] == [([103, 104, 105], 3, 9), ([112, 113, 114], 3, 9), ([119], 1, 4)]
    assert shares[2] == [([106, 107, 108], 6, 9), ([115, 116, 117], 6, 9), ([120, 121], 2, 4)]


def test_a_last_training_batch_smaller_than_the_number_of_ranks_is_left_out(monkeypatch):
    monkeypatch.setattr(data_parallel_module, "world_size", lambda: 4)
    monkeypatch.setattr(data_parallel_module, "rank", lambda: 3)
    order = np.arange(19)  # a global batch of 16, then 3 images for 4 ranks
    assert [index.tolist() for index, _, _ in batch_shares(order, 4, True)] == [[12, 13, 14, 15]]
    # Evaluation keeps every image; this rank's share of the last batch is one of them.
    assert [index.tolist() for index, _, _ in batch_shares(order, 4, False)] == [[12, 13, 14, 15], [18]]


def test_a_mistake_found_on_one_rank_is_raised_on_every_rank_and_rank_0_sends_what_it_read(two_ranks):
    for ranks in two_ranks:
        assert ranks["collectives"]["raised"] == "rank 1: no data here"
        assert ranks["collectives"]["sent"] == "read on rank 0"


def test_rows_of_unequal_counts_are_gathered_in_rank_order(two_ranks):
    for ranks in two_ranks:
        assert ranks["collectives"]["rows"].tolist() == [[0, 0], [1, 1], [1, 1]]


def test_sync_batch_norm_on_two_halves_is_batch_norm_on_the_whole_batch(two_ranks):
    torch.manual_seed(0)
    x = (torch.randn(6, 4, 3, 3) * 2 + 1).requires_grad_()
    weights = torch.randn(6, 4, 3, 3)
    bn = nn.BatchNorm2d(4)
    out = bn(x)
    (out * weights).sum().backward()
    halves = [ranks["batch_norm"] for ranks in two_ranks]
    torch.testing.assert_close(torch.cat([h["out"] for h in halves]), out.detach())
    # Each rank's input gradient includes what the other rank's loss owes to the shared statistics.
    torch.testing.assert_close(torch.cat([h["grad_x"] for h in halves]), x.grad)
    # DistributedDataParallel would average the parameter gradients; their sum is the whole batch's.
    torch.testing.assert_close(halves[0]["grad_weight"] + halves[1]["grad_weight"], bn.weight.grad)
    torch.testing.assert_close(halves[0]["grad_bias"] + halves[1]["grad_bias"], bn.bias.grad)
    for h in halves:
        torch.testing.assert_close(h["running_mean"], bn.running_mean)
        torch.testing.assert_close(h["running_var"], bn.running_var)


@pytest.mark.parametrize("name", sorted(CASES))
def test_after_training_steps_every_rank_holds_the_same_codebook_and_weights(two_ranks, name):
    first, second = (ranks[name]["state"] for ranks in two_ranks)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    if CASES[name][0] == "vqvae":
        # The codebook moved from where it started, so equal codebooks were kept equal, not left alone.
        seed_everything(case_config(name, BATCH)["seed"])  # as trained_and_evaluated starts
        untrained = build_model("vqvae", case_config(name, BATCH)).state_dict()
        for key in LEARNT.get(name, ["quantizer.embed_sum"]):
            assert not torch.allclose(first[key], untrained[key]), key


@pytest.mark.parametrize("name", ["pixel_vqvae", "vqvae_ssim", "vae", "residual", "fsq"])
def test_two_processes_of_batch_b_train_and_evaluate_as_one_process_of_batch_2b(two_ranks, one_process, name, tiny_data):
    one, two = one_process[name], two_ranks[0][name]
    for key, expected in one["state"].items():
        assert_close_to_scale(two["state"][key], expected, key)
    assert two["means"].keys() == one["means"].keys()
    for key, expected in one["means"].items():
        assert two["means"][key] == pytest.approx(expected, rel=1e-4), key
    if one["codes"] is not None:
        # A latent within rounding of two codes may take the other one.
        assert np.abs(two["codes"] - one["codes"]).sum() <= 0.01 * one["codes"].sum()
    assert two_ranks[1][name]["reconstructions"] is None  # rank 0 alone holds them
    test_set = load_split(tiny_data, "test").subset(TEST_IMAGES)
    metrics_two = image_metrics(test_set.images, two["reconstructions"], test_set.masks)
    metrics_one = image_metrics(test_set.images, one["reconstructions"], test_set.masks)
    assert metrics_two == pytest.approx(metrics_one, rel=1e-3)


def torchrun(output_dir, data_dir, *extra, name):
    """train_pixel_vqvae.py through torchrun in two gloo processes, on the tiny settings of `train`."""
    command = train_command("train_pixel_vqvae.py", output_dir, data_dir, *extra, name=name)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(launcher + command[1:], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def output_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def command_line_runs(tmp_path_factory, tiny_data):
    """Folders of one process of batch 16, and of two of batch 8 stopped after one epoch of two
    and resumed."""
    out = tmp_path_factory.mktemp("command_line")
    images = f"--max_train_images={TRAIN_IMAGES}"
    one = train("train_pixel_vqvae.py", out, tiny_data, "--batch_size=16", images, name="one")
    assert one.returncode == 0, one.stderr[-3000:]
    halves = torchrun(out, tiny_data, "--batch_size=8", images, "--epochs=1", name="two")
    assert halves.returncode == 0, halves.stderr[-3000:]
    resumed = torchrun(out, tiny_data, "--batch_size=8", images, "--resume=True", name="two")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out / "one", out / "two"


def test_torchrun_stopped_and_resumed_writes_what_one_process_writes(command_line_runs):
    one, two = command_line_runs
    assert output_files(two) == output_files(one)
    weights_one = torch.load(one / "model.pt", weights_only=True)["model"]
    weights_two = torch.load(two / "model.pt", weights_only=True)["model"]
    for key, expected in weights_one.items():
        # Adam divides each gradient by its own size, so the rounding of a small one reaches the
        # weights magnified: 1e-6 was seen, against Adam steps of 3e-3.
        assert_close_to_scale(weights_two[key], expected, key, absolute=1e-4)
    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    for key in ["mse", "ssim", "psnr", "exact_pixel_rate", "codes_used", "perplexity"]:
        assert metrics_two[key] == pytest.approx(metrics_one[key], rel=1e-3), key
    history = json.loads((two / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and history[0]["train_images"] == TRAIN_IMAGES


def test_a_mistake_under_torchrun_ends_every_rank_with_one_line_from_rank_0(command_line_runs, tiny_data):
    done = torchrun(command_line_runs[1].parent, tiny_data, name="two")
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "already holds an experiment" in ours[0]
    # What follows is torchrun's own report, with its own traceback: none comes from our code
    # (torch itself may be installed under the project, as CI's .venv is).
    ours_in_traceback = [line for line in done.stderr.splitlines()
                         if f'File "{ROOT}' in line and "site-packages" not in line]
    assert "exitcode  : 2" in done.stderr and not ours_in_traceback
