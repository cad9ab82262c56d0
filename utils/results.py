"""The results of `python -m utils.reproduce`: each experiment's small files kept in docs/results/,
and the tables and figures of results.md built from those files alone, so that another machine
can rebuild them without the weights or the reconstructions."""
import json
import math
import shutil
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.figures import ablation_figure, rate_figure, reconstruction_figure
from utils.io import atomic_path, write_json
from utils.metrics import code_grid_size, load_rgb
from utils.report import reference_dir

RUN_FILE = "reproduce.json"  # the plan's entry, the budget and the wall time
OOD_FILE = "ood_metrics.json"  # scores on the test split of a set never trained on
SMALL_FILES = ("config.json", "metrics.json", "history.json", "fid.json", OOD_FILE, "fusions/overview.png",
               "samples/nearest.json")
SHOWN_SPRITES = 8
SHOWN_DIR = "shown"  # the reconstructions of the sprites every model is shown on
TEST_SPRITES = "test_sprites"  # their inputs, once for all experiments


def shown_sprites(names, count=SHOWN_SPRITES):
    """`count` test sprites spread evenly over the unaugmented ones on white (over all, where there
    are fewer), by name: the same for every experiment scored on the same test split."""
    plain = sorted(name for name in names if name.endswith("__white__orig.png"))
    pool = plain if len(plain) >= count else sorted(names)
    return [pool[i * len(pool) // count] for i in range(min(count, len(pool)))]


def _copy(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def publish(experiment, target, run):
    """Copy an experiment's config, metrics, history, FID, figures (no weights, no reconstructions
    folder) and `run` into `target`; for an autoencoder, also the shown sprites and their inputs."""
    for name in SMALL_FILES:
        if (experiment / name).is_file():
            _copy(experiment / name, target / name)
    for figure in experiment.glob("*.png"):
        _copy(figure, target / figure.name)
    reconstructions = experiment / "reconstructions"
    if reconstructions.is_dir():
        inputs = reference_dir(json.loads((experiment / "config.json").read_text()))
        for name in shown_sprites([p.name for p in reconstructions.glob("*.png")]):
            _copy(reconstructions / name, target / SHOWN_DIR / name)
            _copy(inputs / name, target.parent / TEST_SPRITES / name)
    write_json(target / RUN_FILE, run)


def _read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(results_dir):
    """Every published experiment under `results_dir`, in plan order (reproduce.json's `order`)."""
    found = []
    for folder in sorted(Path(results_dir).iterdir()) if Path(results_dir).is_dir() else []:
        run = _read(folder / RUN_FILE)
        if run is not None:
            found.append({**run, "path": folder, "metrics": _read(folder / "metrics.json"),
                          "config_json": _read(folder / "config.json") or {}, "fid": _read(folder / "fid.json") or {},
                          "ood": _read(folder / OOD_FILE)})
    return sorted(found, key=lambda r: r["order"])


def fid_of(result):
    """The FID of an autoencoder's reconstructions at the run's dims, or of a prior's samples."""
    if result["group"] == "downstream":
        return result["metrics"].get("fid")
    record = result["fid"].get(f"bilinear-{result['fid_dims']}")
    return None if record is None else record["fid"]


def by_config(results, group):
    """{config: [results of its seeds]} for one group, in plan order."""
    configs = {}
    for r in results:
        if r["group"] == group and r["metrics"] is not None:
            configs.setdefault(r["config"], []).append(r)
    return configs


def spread(values):
    """(mean, sample sd or None) of the values that are not None."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell(values, digits, scale=1.0, suffix=""):
    mean, sd = spread(values)
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}{suffix}"
    return text if sd is None else f"{text} ± {sd * scale:.{digits}f}{suffix}"


def _markdown(header, rows):
    align = [":--", ":--"] + ["--:"] * (len(header) - 2)
    return "\n".join("| " + " | ".join(row) + " |" for row in [list(header), align] + rows)


AUTOENCODER_HEADER = ("configuration", "seeds", "bits/sprite", "epochs", "test MSE", "SSIM", "sprite exact pixels",
                      "palette-exact pixels", "palette colours (bits)", "codes used", "FID", "wall seconds")


def untimed(run):
    """Whether `run`'s recorded wall time misses attempts: less than its training alone. Attempts
    killed before utils.reproduce timed them in progress were never recorded."""
    train = (run["metrics"] or {}).get("train_seconds")
    return run["wall_seconds"] is not None and train is not None and run["wall_seconds"] < train


def wall_of(run):
    return None if untimed(run) else run["wall_seconds"]


def autoencoder_rows(configs):
    rows = []
    for config, runs in configs.items():
        metrics = [r["metrics"] for r in runs]
        bits = metrics[0]["bits_per_sprite"]
        palette = _cell([m["palette_colours"] for m in metrics], 1)
        palette_bits = _cell([m["palette_bits"] for m in metrics], 0)
        rows.append([f"{runs[0]['label']} (`{config}`)", ",".join(str(r["seed"]) for r in runs),
                     "-" if bits is None else f"{bits:.0f}", str(metrics[0]["epochs"]),
                     _cell([m["mse"] for m in metrics], 5), _cell([m["ssim"] for m in metrics], 4),
                     _cell([m["sprite_exact_pixel_rate"] for m in metrics], 1, 100, "%"),
                     _cell([m["palette_exact_pixel_rate"] for m in metrics], 1, 100, "%"),
                     f"{palette} ({palette_bits})", _cell([m.get("codes_used") for m in metrics], 0),
                     _cell([fid_of(r) for r in runs], 2), _cell([wall_of(r) for r in runs], 0)])
    return rows


OOD_HEADER = ("configuration", "seeds", "bits/sprite", "SSIM", "exact pixels", "sprite exact pixels",
              "palette-exact pixels", "output colours (input)", "foreign colours")


def ood_tables(results):
    """{set: (its test images, rows)} of the autoencoders scored out of domain, one row a
    configuration over its seeds."""
    sets = {}
    for r in results:
        if r["ood"] is not None:
            sets.setdefault(r["ood"]["set"], {}).setdefault((r["group"], r["config"]), []).append(r)
    tables = {}
    for name, configs in sets.items():
        rows = []
        for runs in configs.values():
            scores = [r["ood"] for r in runs]
            rows.append([f"{runs[0]['group']}: {runs[0]['label']} (`{runs[0]['config']}`)",
                         ",".join(str(r["seed"]) for r in runs),
                         _cell([s["bits_per_sprite"] for s in scores], 0), _cell([s["ssim"] for s in scores], 4),
                         _cell([s["exact_pixel_rate"] for s in scores], 1, 100, "%"),
                         _cell([s["sprite_exact_pixel_rate"] for s in scores], 1, 100, "%"),
                         _cell([s["palette_exact_pixel_rate"] for s in scores], 1, 100, "%"),
                         f"{_cell([s['output_colours'] for s in scores], 1)} "
                         f"({_cell([s['input_colours'] for s in scores], 1)})",
                         _cell([s["foreign_colour_rate"] for s in scores], 1, 100, "%")])
        tables[name] = (scores[0]["images"], rows)
    return tables


PRIOR_HEADER = ("prior", "epochs", "val bits/code", "test bits/code", "uniform bits/code", "samples", "FID of samples",
                "nearest training image MSE (mean)", "duplicates: pixels / codes", "wall seconds")


def prior_rows(configs):
    rows = []
    for config, runs in configs.items():
        m = runs[0]["metrics"]
        rows.append([f"{runs[0]['label']} (`{config}`, over `{runs[0]['overrides']['vq_experiment']}`)",
                     str(m["epochs"]), "-" if m["val_bits_per_code"] is None else f"{m['val_bits_per_code']:.3f}",
                     f"{m['test_bits_per_code']:.3f}", f"{m['uniform_bits_per_code']:.0f}", str(m["num_samples"]),
                     "-" if m["fid"] is None else f"{m['fid']:.1f} ({m['fid_dims']}-d, vs {m['fid_reference']})",
                     f"{m['nearest_mse_mean']:.5f}",
                     f"{100 * m['duplicate_share']:.1f}% / {100 * m['code_duplicate_share']:.1f}%",
                     _cell([wall_of(r) for r in runs], 0)])
    return rows


TIME_HEADER = ("experiment", "group", "seed", "epochs", "train seconds", "wall seconds (attempts)",
               "FID seconds", "estimated minutes")


def time_rows(results):
    rows = []
    for r in results:
        m = r["metrics"] or {}
        wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f} ({r['attempts']})"
        if untimed(r):
            wall += " and earlier attempts untimed"
        rows.append([r["name"], r["group"], str(r["seed"]), str(m.get("epochs", "unfinished")),
                     f"{m['train_seconds']:.0f}" if "train_seconds" in m else "-", wall,
                     f"{r['fid_seconds']:.0f}" if r.get("fid_seconds") is not None else "-",
                     "-" if r["estimate_minutes"] is None else str(r["estimate_minutes"])])
    return rows


def caption(results):
    budgets = sorted({r["budget"] for r in results})
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    walls = [r["wall_seconds"] + (r.get("fid_seconds") or 0) for r in results if r["wall_seconds"] is not None]
    estimates = [r["estimate_minutes"] for r in results if r["estimate_minutes"] is not None]
    text = (f"Budget: **{', '.join(budgets)}** (`python -m utils.reproduce --budget={budgets[0]}`); seeds "
            f"{', '.join(map(str, seeds))}; {len(results)} experiments, {sum(walls) / 3600:.2f} h of wall time in all, training and FID")
    if estimates:
        text += f" (estimated beforehand: {sum(estimates) / 60:.1f} h on an idle 2-core CPU)"
    missing = sum(map(untimed, results))
    if missing:
        text += (f"; {missing} experiment(s) also ran attempts cut off before they could be timed, which that "
                 "total misses")
    dims = sorted({r["fid_dims"] for r in results})
    return (text + f". Mean ± sample sd over seeds where there are several. FID of the test "
            f"reconstructions (of a prior's samples) against the test split, pytorch-fid's bilinear resize, "
            f"{'/'.join(map(str, dims))}-d features. Bits per sprite: code grid cells x log2(codebook size), "
            "none for the VAE; a palette-output model's also count its palette, 24 bits a colour. Palette-exact: sprite pixels exact once each output pixel is snapped to the "
            "nearest colour of the input sprite's own palette, which costs 24 bits a colour beside the codes.")


def write_results(results_dir):
    """RESULTS/results.md and its figures, from the published experiments alone; returns its path."""
    results = load_results(results_dir)
    results_dir = Path(results_dir)
    if not results:
        raise UserError(f"{results_dir} holds no published experiment (no */{RUN_FILE}); run python -m utils.reproduce")
    paper, ablation = by_config(results, "paper"), by_config(results, "ablation")
    priors, exact = by_config(results, "downstream"), by_config(results, "exact")
    parts = ["# Results of `python -m utils.reproduce`", caption(results)]
    if paper:
        parts += ["## The paper's configurations", _markdown(AUTOENCODER_HEADER, autoencoder_rows(paper))]
    if ablation:
        c = next(iter(ablation.values()))[0]["config_json"]
        side = code_grid_size(c)
        parts += [f"## Equal capacity: a {side}x{side} grid of {c['num_embeddings']} codes of dimension "
                  f"{c['embedding_dim']}, stage by stage",
                  _markdown(AUTOENCODER_HEADER, autoencoder_rows(ablation))]
    if exact:
        parts += ["## Beyond the paper: codes that keep pixel art exact (bits per sprite count the palette)",
                  _markdown(AUTOENCODER_HEADER, autoencoder_rows(exact))]
    for name, (images, rows) in ood_tables(results).items():
        parts += [f"## Out of domain: the {images:,} test images of `{name}`, never trained on (bits per sprite "
                  "count that set's palettes)", _markdown(OOD_HEADER, rows)]
    if priors:
        parts += ["## Downstream: the same PixelCNN prior over each model's codes",
                  _markdown(PRIOR_HEADER, prior_rows(priors))]
    parts += ["## Wall time of each experiment", _markdown(TIME_HEADER, time_rows(results)), "## Figures"]
    figures = []
    shown = [(f"{r['group']}: {r['label']}", *shown_images(r, results_dir / TEST_SPRITES)) for r in first_seeds(results)]
    if shown:
        reconstruction_figure(shown, results_dir / "reconstructions.png")
        figures.append(("the same test sprites (top row) reconstructed by every model, first seed",
                        "reconstructions.png"))
    points = [(f"{runs[0]['group']}: {runs[0]['label']}", runs[0]["metrics"]["bits_per_sprite"],
               spread([r["metrics"]["sprite_exact_pixel_rate"] for r in runs]),
               spread([r["metrics"]["ssim"] for r in runs])) for runs in [*paper.values(), *ablation.values(), *exact.values()]]
    if rate_figure(points, results_dir / "rate_exactness.png"):
        figures.append(("sprite-pixel exactness and SSIM against bits per sprite (mean and sd over seeds; "
                        "the VAE has no bit count and is left out)", "rate_exactness.png"))
    if ablation:
        stages = [(runs[0]["label"], {name: spread([r["metrics"][key] for r in runs]) for name, key in ABLATION_BARS})
                  for runs in ablation.values()]
        ablation_figure(stages, results_dir / "ablation.png")
        figures.append(("the ablation, stage by stage (mean and sd over seeds)", "ablation.png"))
    for runs in priors.values():
        if (runs[0]["path"] / "nearest_grid.png").is_file():
            figures.append((f"{runs[0]['label']}: rows of samples over their nearest training images",
                            f"{runs[0]['name']}/nearest_grid.png"))
    parts += [f"![{label}]({path})\n\n{label}" for label, path in figures]
    path = results_dir / "results.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    return path


ABLATION_BARS = (("sprite exact pixels", "sprite_exact_pixel_rate"),
                 ("palette-exact pixels", "palette_exact_pixel_rate"), ("SSIM", "ssim"))


def first_seeds(results):
    """The first seed's run of every autoencoder configuration that has shown sprites."""
    firsts = {}
    for r in results:
        if r["group"] != "downstream" and r["metrics"] is not None and (r["path"] / SHOWN_DIR).is_dir():
            firsts.setdefault(r["config"], r)
    return list(firsts.values())


def shown_images(result, test_sprites):
    """(inputs, reconstructions) of the sprites shown for `result`, as uint8 arrays, paired by name."""
    names = sorted(p.name for p in (result["path"] / SHOWN_DIR).glob("*.png"))
    return (np.stack([load_rgb(Path(test_sprites) / n) for n in names]),
            np.stack([load_rgb(result["path"] / SHOWN_DIR / n) for n in names]))
