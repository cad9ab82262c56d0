"""python -m utils.reproduce: the whole plan at the smoke budget through its real command line,
skipping what is finished, resuming what was interrupted, refusing a folder that is not the plan's."""
import json
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, files, refusal
from tests.sprites import write_species_folders
from utils.data.load import load_split
from utils.data.prepare import PrepareOptions, prepare
from utils.device import describe_machine
from utils.io import write_json
from utils.metrics import bits_per_sprite
from utils.reproduce import plan as planned
from utils.reproduce.results import AUTOENCODER_HEADER, OOD_FILE, RUN_FILE, SHOWN_DIR, TEST_SPRITES
from utils.reproduce.run import main, script_defaults

FID_DIMS = 64  # the random-weights network's smallest features: a real FID, cheap on tiny images


def reproduce(folders, *extra):
    outputs, results, data, weights, ood = folders
    return subprocess.run([sys.executable, "-m", "utils.reproduce", "--budget=smoke", "--seeds=42",
                           f"--dataset={data}", f"--outputs={outputs}", f"--results={results}",
                           f"--fid-weights={weights}", f"--fid-dims={FID_DIMS}", f"--ood={ood}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_data, random_weights):
    """The whole smoke plan run once; (folders, the finished run, its seconds)."""
    root = tmp_path_factory.mktemp("reproduce")
    # Sprites of other species, drawn by another seed: the plan's out-of-domain set, never trained on.
    write_species_folders(root / "ood_src", species=10, per_species=2, seed=7)
    prepare(root / "ood_src", root / "ood", PrepareOptions(image_size=16, rotations=(15,)), log=lambda _: None,
            workers=1)
    folders = (root / "outputs", root / "results", tiny_data, random_weights, root / "ood")
    started = time.perf_counter()
    done = reproduce(folders)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return folders, done, time.perf_counter() - started


def smoke_plan():
    return planned.plan("smoke", [42], script_defaults)


def test_smoke_plan_holds_every_group_at_equal_capacity():
    entries = smoke_plan()
    names = [e["name"] for e in entries]
    # The priors come right after the models they read, before the weights could be lost.
    assert names == ["ablation_vqvae_s42", "ablation_adapter_s42", "ablation_pixelsight_s42",
                     "ablation_pixel_vqvae_s42", "ablation_pixel_vqvae_ssim_s42", "prior_pixel_vqvae_s42",
                     "prior_vqvae_s42", "paper_pixel_vqvae_s42", "paper_vqvae_s42", "paper_vae_s42",
                     "exact_residual_pixel_vqvae_s42", "exact_fsq_pixel_vqvae_s42", "exact_palette_vqvae_s42",
                     "exact_palette_pixel_vqvae_s42", "exact_palette_per_pixel_s42",
                     "exact_palette_context_pixel_vqvae_s42", "exact_palette_context_per_pixel_s42",
                     "prior_palette_pixel_vqvae_s42", "tokenizer_tokenizer_s42", "tokenizer_paper_pixel_vqvae_s42",
                     "tokenizer_adapter_s42", "tokenizer_vqvae_ssim_s42", "tokenizer_ssim_s42",
                     "generation_gpt_tokenizer_s42"]
    ablation = {e["config"]: {**script_defaults(e["script"]), **e["overrides"]} for e in entries
                if e["group"] == "ablation"}
    # Every stage has the same grid and codebook; each adds its switch to the stage before.
    assert {(c["num_layers"], c["num_embeddings"], c["embedding_dim"]) for c in ablation.values()} == {(2, 16, 8)}
    switches = [(c["adapter_layer"], c["pixelsight_filters"] > 0, c["use_ssim_loss"]) for c in ablation.values()]
    assert switches == [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
                        (True, True, True)]
    priors = [e for e in entries if e["group"] == "downstream"]
    assert [p["overrides"]["vq_experiment"] for p in priors] == ["ablation_pixel_vqvae_s42", "ablation_vqvae_s42",
                                                                 "exact_palette_pixel_vqvae_s42"]
    for prior in priors:
        assert prior["overrides"] == {**priors[1]["overrides"], "vq_experiment": prior["overrides"]["vq_experiment"]}


def test_cpu_and_paper_budgets_keep_one_budget_per_group_and_draw_1000_samples():
    for budget in ("cpu", "paper"):
        entries = planned.plan(budget, list(planned.SEEDS), script_defaults)
        ablation = [e for e in entries if e["group"] == "ablation"]
        assert len(ablation) == 15
        assert len({(e["overrides"].get("epochs"), e["overrides"].get("learning_rate")) for e in ablation}) == 1
        assert all(e["overrides"]["num_samples"] >= 1000 for e in entries if e["group"] == "downstream")
        assert all(e["estimate_minutes"] > 0 for e in entries)
    paper = planned.plan("paper", list(planned.SEEDS), script_defaults)
    # The paper's length is the scripts' own: no epochs overridden, so 25 for every autoencoder.
    assert all("epochs" not in e["overrides"] for e in paper)
    cpu = planned.plan("cpu", list(planned.SEEDS), script_defaults)
    # The paper's comparison takes about 6.5 hours; the exact codes of issue 20 add about twelve.
    comparison = [e for e in cpu if e["group"] not in ("exact", "tokenizer", "generation")
                  and not any(n.startswith("exact_") for n in e["needs"])]
    assert sum(e["estimate_minutes"] for e in comparison) <= 7 * 60
    assert sum(e["estimate_minutes"] for e in cpu if e["group"] not in ("tokenizer", "generation")) <= 20 * 60
    exact = {e["config"]: {**script_defaults(e["script"]), **e["overrides"]} for e in cpu if e["group"] == "exact"}
    assert sum(c["palette_output"] for c in exact.values()) == 5 and len(exact) == 7
    assert [name for name, c in exact.items() if c["palette_context"]] == ["exact_palette_context_pixel_vqvae",
                                                                          "exact_palette_context_per_pixel"]
    # The new quantisers stand at the ablation's grid, and the residual one at the ceiling of
    # twice the Pixel VQ-VAE's 2,560 bits, FSQ at the same rate as the EMA codebook.
    assert bits_per_sprite(exact["exact_residual_pixel_vqvae"]) == 2 * bits_per_sprite(exact["exact_fsq_pixel_vqvae"])
    assert bits_per_sprite(exact["exact_fsq_pixel_vqvae"]) == 2560


def test_smoke_runs_every_experiment_and_writes_results_md_with_each(smoke):
    (outputs, results, *_, ood), done, _ = smoke
    table = (results / "results.md").read_text()
    ood_images = load_split(ood, "test").images
    for entry in smoke_plan():
        name = entry["name"]
        metrics = json.loads((outputs / name / "metrics.json").read_text())
        # The small files travel into the results; the weights and reconstructions do not.
        published = {p.relative_to(results / name).as_posix() for p in (results / name).rglob("*") if p.is_file()}
        assert {"config.json", "metrics.json", "history.json", "reproduce.json"} <= published
        assert not any(p.endswith(".pt") or p.startswith("reconstructions/") for p in published)
        assert json.loads((results / name / "metrics.json").read_text()) == metrics
        assert f"`{entry['config']}`" in table and name in table
        if planned.is_prior(entry):
            assert "nearest_grid.png" in published and f"{name}/nearest_grid.png" in table
            continue
        assert metrics["palette_colours"] > 0 and 0 <= metrics["palette_exact_pixel_rate"] <= 1
        # Snapping to the sprite's own palette can only add exact pixels.
        assert metrics["palette_exact_pixel_rate"] >= metrics["sprite_exact_pixel_rate"]
        config = json.loads((outputs / name / "config.json").read_text())
        levels = config.get("residual_depth", 1) if config.get("quantizer") == "residual" else 1
        codes = None if entry["script"] == "train_vae.py" else (16 // 2 ** config["num_layers"]) ** 2 * 4 * levels
        if config.get("palette_output") or config.get("palette_snap"):
            # The palette travels beside the codes: 24 bits for each of the image's colours.
            assert metrics["bits_per_sprite"] == pytest.approx(codes + 24 * metrics["input_colours"])
            assert metrics["foreign_colour_rate"] == 0.0
        else:
            assert metrics["bits_per_sprite"] == codes
        # Scored on the other species too, with the bits that set's own palettes cost.
        scores = json.loads((results / name / OOD_FILE).read_text())
        assert scores == json.loads((outputs / name / OOD_FILE).read_text())
        assert scores["set"] == "ood" and scores["images"] == len(ood_images)
        assert scores["bits_per_sprite"] == bits_per_sprite(config, ood_images)
        assert f"{100 * scores['sprite_exact_pixel_rate']:.1f}%" in table
        fid = json.loads((results / name / "fid.json").read_text())[f"bilinear-{FID_DIMS}"]["fid"]
        assert json.loads((results / name / "reproduce.json").read_text())["fid_seconds"] > 0
        assert f"{fid:.2f}" in table
        shown = sorted(p.name for p in (results / name / SHOWN_DIR).iterdir())
        assert len(shown) == 8 and all((results / TEST_SPRITES / n).is_file() for n in shown)
    for figure in ("reconstructions.png", "rate_exactness.png", "ablation.png"):
        assert (results / figure).stat().st_size > 0 and f"]({figure})" in table
    assert "Budget: **smoke**" in table and "seeds 42;" in table
    assert f"Out of domain: the {len(ood_images):,} test images of `ood`" in table


def test_second_invocation_skips_everything_and_rebuilds_the_same_tables(smoke):
    folders, _, first_seconds = smoke
    outputs, results = folders[:2]
    before = files(outputs)
    started = time.perf_counter()
    again = reproduce(folders)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": done") == len(smoke_plan()) and ": new" not in again.stdout
    assert time.perf_counter() - started < first_seconds / 3
    assert files(outputs) == before


def test_tables_only_rebuilds_results_md_from_the_results_folder_alone(smoke, tmp_path):
    (_, results, *_), _, _ = smoke
    copy = tmp_path / "results"
    subprocess.run(["cp", "-r", str(results), str(copy)], check=True)
    (copy / "results.md").unlink()
    done = subprocess.run([sys.executable, "-m", "utils.reproduce", "--tables-only", f"--results={copy}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (copy / "results.md").read_text() == (results / "results.md").read_text()


def test_a_wall_time_shorter_than_the_training_is_shown_as_missing_attempts(smoke, tmp_path):
    (_, results, *_), _, _ = smoke
    copy = tmp_path / "results"
    subprocess.run(["cp", "-r", str(results), str(copy)], check=True)
    # What a run resumed from an attempt that no one timed looks like once published.
    run_path = copy / "paper_vqvae_s42" / RUN_FILE
    train = json.loads((copy / "paper_vqvae_s42" / "metrics.json").read_text())["train_seconds"]
    write_json(run_path, {**json.loads(run_path.read_text()), "wall_seconds": train / 2, "attempts": 1})
    done = subprocess.run([sys.executable, "-m", "utils.reproduce", "--tables-only", f"--results={copy}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (copy / "results.md").read_text()
    assert "1 experiment(s) also ran attempts cut off before they could be timed" in text
    row = next(line for line in text.splitlines() if line.startswith("| paper_vqvae_s42 |"))
    assert row.split(" | ")[5].endswith("(1) and earlier attempts untimed")
    # The results table's row, not the settings table's, which names the same configuration.
    paper_row = next(line for line in text.splitlines()
                     if "(`paper_vqvae`)" in line and line.count(" | ") == len(AUTOENCODER_HEADER) - 1)
    assert paper_row.rstrip(" |").endswith("| -")


def test_an_interrupted_experiment_is_resumed_from_its_checkpoint(smoke):
    folders, _, _ = smoke
    experiment = folders[0] / "paper_vqvae_s42"
    checkpoint = (experiment / "checkpoint.pt").read_bytes()
    # Killed after its last checkpoint, before its metrics: what a power cut at the end leaves. The
    # command died with it, so the attempt was never timed: it started 100 s before its log's last line.
    (experiment / "metrics.json").unlink()
    timing_path = folders[0] / ".reproduce" / "paper_vqvae_s42.json"
    before = json.loads(timing_path.read_text())
    log_path = folders[0] / ".reproduce" / "paper_vqvae_s42.log"
    write_json(timing_path, {**before, "running_since": log_path.stat().st_mtime - 100})
    done = reproduce(folders, "--only=paper")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "paper_vqvae_s42 (paper, train_vqvae.py): resume" in done.stdout
    log = (folders[0] / ".reproduce" / "paper_vqvae_s42.log").read_text()
    assert log.splitlines()[[i for i, line in enumerate(log.splitlines()) if line.startswith("$ ")][-1]].endswith(
        "--resume=True")
    assert "resumed" in log and (experiment / "checkpoint.pt").read_bytes() == checkpoint
    assert (experiment / "metrics.json").exists()
    timing = json.loads((folders[1] / "paper_vqvae_s42" / "reproduce.json").read_text())
    assert timing["attempts"] == 3 and "running_since" not in timing
    assert timing["wall_seconds"] > before["wall_seconds"] + 100
    # Both attempts ran on this processor, named once.
    assert timing["machines"] == [describe_machine(torch.device("cpu"))]


def test_a_folder_whose_config_differs_from_the_plan_is_refused_and_left_alone(smoke):
    folders, _, _ = smoke
    config_path = folders[0] / "ablation_adapter_s42" / "config.json"
    original = config_path.read_bytes()
    config_path.write_text(json.dumps({**json.loads(original), "epochs": 7}))
    before = files(folders[0])
    try:
        line = refusal(reproduce(folders))
        after = files(folders[0])
    finally:
        config_path.write_bytes(original)
    assert line.startswith("error:") and "ablation_adapter_s42" in line and "epochs (folder 7, plan 1)" in line
    # Refused before anything ran: no experiment, log or result was touched.
    assert after == before


def test_a_new_machine_skips_what_is_published_and_retrains_what_an_unfinished_prior_needs(smoke, tmp_path):
    (_, results, data, weights, ood), _, _ = smoke
    copy = tmp_path / "results"
    subprocess.run(["cp", "-r", str(results), str(copy)], check=True)
    folders = (tmp_path / "outputs", copy, data, weights, ood)
    done = reproduce(folders, "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(": published") == len(smoke_plan())
    # One prior's results lost: it runs again, and so must the model whose weights it reads.
    subprocess.run(["rm", "-r", str(copy / "prior_vqvae_s42")], check=True)
    lines = reproduce(folders, "--dry-run").stdout.splitlines()
    new = [line.split()[1] for line in lines if line.endswith(": new")]
    assert new == ["ablation_vqvae_s42", "prior_vqvae_s42"]
    assert not (tmp_path / "outputs").exists()


def test_a_published_experiment_whose_config_differs_from_the_plan_is_refused(smoke, tmp_path):
    (_, results, data, weights, ood), _, _ = smoke
    copy = tmp_path / "results"
    subprocess.run(["cp", "-r", str(results), str(copy)], check=True)
    config_path = copy / "paper_vae_s42" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "latent_dim": 3}))
    line = refusal(reproduce((tmp_path / "outputs", copy, data, weights, ood), "--dry-run"))
    assert line.startswith("error:") and "published" in line and "latent_dim (folder 3, plan 8)" in line


def test_only_a_group_also_runs_the_experiments_it_needs(tmp_path, capsys):
    assert main(["--only=downstream", "--dry-run", f"--outputs={tmp_path}", f"--results={tmp_path}"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    # The priors read the first seed's 16x16 VQ-VAE, Pixel VQ-VAE and palette Pixel VQ-VAE, which come first.
    assert listed == ["ablation_vqvae_s42", "ablation_pixel_vqvae_s42", "prior_pixel_vqvae_s42", "prior_vqvae_s42",
                      "exact_palette_pixel_vqvae_s42", "prior_palette_pixel_vqvae_s42"]
    assert not any(tmp_path.iterdir())


def test_an_unknown_group_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--only=ablations", "--dry-run", f"--outputs={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "ablations" in err[0]


def test_an_out_of_domain_folder_that_is_not_prepared_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--dry-run", f"--outputs={tmp_path}", f"--ood={tmp_path / 'sprites'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ood") and "not a prepared set" in err[0]
    assert not any(tmp_path.iterdir())


def test_the_tokenizer_and_the_papers_16x16_model_train_the_same_length_on_the_same_grid():
    cpu = planned.plan("cpu", list(planned.SEEDS), script_defaults)
    runs = {e["name"]: {**script_defaults(e["script"]), **e["overrides"]} for e in cpu if e["group"] == "tokenizer"}
    assert len(runs) == 5 * 3
    # The comparison that a cut keeps comes first: both models at every seed, then the ablation over it.
    assert list(runs)[:6] == [f"tokenizer_{c}_s{s}" for c in ("tokenizer", "paper_pixel_vqvae") for s in (42, 1, 2)]
    keys = ("num_layers", "num_embeddings", "embedding_dim", "epochs", "learning_rate", "lr_schedule",
            "warmup_steps", "grad_clip", "plain_backgrounds_only", "batch_size")
    assert len({tuple(c[k] for k in keys) for c in runs.values()}) == 1
    tokenizer, paper = runs["tokenizer_tokenizer_s42"], runs["tokenizer_paper_pixel_vqvae_s42"]
    assert (tokenizer["architecture"], paper["architecture"]) == ("residual", "paper")
    assert paper["adapter_layer"] and paper["pixelsight_filters"] == 512
    assert bits_per_sprite(paper) == 2560


def test_the_gpt_prior_models_the_first_seeds_tokenizer_at_every_seed_and_is_scored_as_a_prior():
    cpu = planned.plan("cpu", list(planned.SEEDS), script_defaults)
    generation = [e for e in cpu if e["group"] == "generation"]
    assert [e["name"] for e in generation] == [f"generation_gpt_tokenizer_s{s}" for s in (42, 1, 2)]
    assert {e["overrides"]["vq_experiment"] for e in generation} == {"tokenizer_tokenizer_s42"}
    assert all(e["needs"] == ["tokenizer_tokenizer_s42"] and planned.is_prior(e) for e in generation)
    names = [e["name"] for e in cpu]
    assert names.index("tokenizer_tokenizer_s42") < names.index("generation_gpt_tokenizer_s42")
    config = {**script_defaults("train_gpt.py"), **generation[0]["overrides"]}
    assert config["condition_on_background"] and config["num_samples"] >= 1000
    assert not planned.is_prior(next(e for e in cpu if e["name"] == "tokenizer_tokenizer_s42"))
