"""The results of `python -m utils.reproduce`: each experiment's small files kept in docs/results/,
and the tables and figures of results.md built from those files alone, so that another machine
can rebuild them without the weights or the reconstructions."""
import json
import math
import shutil
from pathlib import Path

import numpy as np

from models.palette import BITS_PER_COLOUR
from utils.errors import UserError
from utils.reproduce.figures import ablation_figure, rate_figure, reconstruction_figure
from utils.io import atomic_path, write_json
from utils.metrics import code_grid_size, draws_with_palette, load_rgb
from utils.reproduce.plan import is_prior
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
    if is_prior(result):
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


BOUNDS_DIR = "bounds"  # bench/exact_bounds.py --out=RESULTS/bounds/<set>.json: floors, bounds and codec rates
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
SAME = "not distinguishable"


def load_bounds(results_dir):
    """{set: the figures bench/exact_bounds.py wrote for it}, from RESULTS/bounds/*.json."""
    folder = Path(results_dir) / BOUNDS_DIR
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def value_of(run, key):
    """A run's figure by name: a metrics.json key, 'fid', or 'val_loss' (its last epoch's)."""
    if key == "fid":
        return fid_of(run)
    if key == "val_loss":
        history = _read(run["path"] / "history.json") or [{}]
        return history[-1].get("val_loss")
    return run["metrics"].get(key)


def missing_keys(run, others):
    """The config keys `run` lacks that `others` of its script have: a run of older code, before
    those keys existed, reads as such. `others` are the runs it is compared with, not every
    published run: a later experiment on newer code does not make two seeds of one code unequal."""
    keys = set().union(*(r["config_json"] for r in others if r["script"] == run["script"]))
    return sorted(keys - set(run["config_json"]))


def machines_of(runs):
    """'seed 1, 2: <processor>; seed 42: not recorded', from each run's reproduce.json."""
    by_machine = {}
    for r in runs:
        by_machine.setdefault(", ".join(r.get("machines") or ["not recorded"]), {})[str(r["seed"])] = None
    return "; ".join(f"seed {', '.join(seeds)}: {machine}" for machine, seeds in by_machine.items())


def length_of(run):
    c = run["config_json"]
    return (run["metrics"].get("epochs"), c.get("learning_rate"), c.get("max_train_images"))


def compare(a, b, key, lower_is_better=False):
    """Whether configuration `a`'s runs beat `b`'s on `key`: 'better', 'worse' or SAME, with the
    reason and the seed ranges. A difference is claimed only between runs of the same code (no
    config key missing) and the same length, at two seeds or more each, whose min-max ranges do
    not overlap."""
    current = [[r for r in runs if not missing_keys(r, [*a, *b]) and value_of(r, key) is not None] for runs in (a, b)]
    dropped = sorted({r["seed"] for r in [*a, *b]} - {r["seed"] for r in [*current[0], *current[1]]})
    ranges = [(min(value_of(r, key) for r in runs), max(value_of(r, key) for r in runs)) if runs else None
              for runs in current]
    outcome = {"verdict": SAME, "ranges": ranges, "seeds": [[r["seed"] for r in runs] for runs in current],
               "dropped": dropped}
    if min(map(len, current)) < 2:
        return {**outcome, "reason": "fewer than two seeds of the same code"}
    if len({length_of(r) for r in [*current[0], *current[1]]}) > 1:
        return {**outcome, "reason": "different training lengths"}
    (a_low, a_high), (b_low, b_high) = ranges
    if a_low > b_high or a_high < b_low:
        higher = a_low > b_high
        return {**outcome, "verdict": "better" if higher != lower_is_better else "worse",
                "reason": "the seed ranges do not overlap"}
    return {**outcome, "reason": "the seed ranges overlap"}


def _range_text(bounds, digits, scale, suffix):
    low, high = bounds
    return f"{low * scale:.{digits}f}{suffix}" if low == high else \
        f"{low * scale:.{digits}f}–{high * scale:.{digits}f}{suffix}"


METRICS = {  # key: (name, digits, scale, suffix, lower is better)
    "ssim": ("SSIM", 3, 1, "", False), "mse": ("test MSE", 5, 1, "", True),
    "sprite_exact_pixel_rate": ("sprite exact pixels", 1, 100, "%", False),
    "palette_exact_pixel_rate": ("palette-exact pixels", 1, 100, "%", False),
    "fid": ("FID", 1, 1, "", True), "val_loss": ("final validation loss", 3, 1, "", True),
}


def comparison_sentence(a, b, key):
    """One sentence: `a` against `b` on `key`, with the seeds, their ranges and the verdict."""
    name, digits, scale, suffix, lower = METRICS[key]
    outcome = compare(a, b, key, lower)
    sides = [f"{runs[0]['label']} ({_range_text(r, digits, scale, suffix)}, seeds "
             f"{', '.join(map(str, seeds))})" if r else f"{runs[0]['label']} (no seed of the same code)"
             for runs, r, seeds in zip((a, b), outcome["ranges"], outcome["seeds"])]
    verdict = outcome["verdict"] if outcome["verdict"] == SAME else f"{outcome['verdict']} ({'lower' if lower else 'higher'} is better)"
    return f"{name}: {sides[0]} against {sides[1]}: {verdict}, {outcome['reason']}."


def _percent(share, digits=1):
    return f"{100 * share:.{digits}f}%"


def _runs_text(runs):
    return f"seed{'s' if len(runs) > 1 else ''} {', '.join(str(r['seed']) for r in runs)}"


def setup_section(results, groups):
    """Data, split, budgets and machines, from the published files."""
    rows = []
    for group, configs in groups.items():
        for config, runs in configs.items():
            c, m = runs[0]["config_json"], runs[0]["metrics"]
            history = _read(runs[0]["path"] / "history.json") or [{}]
            images = history[0].get("train_images", history[0].get("train_grids"))
            rows.append([f"{runs[0]['label']} (`{config}`)", group, _runs_text(runs), str(m.get("epochs")),
                         f"{c.get('learning_rate')}", "-" if images is None else f"{images:,}", machines_of(runs)])
    tests = sorted({r["metrics"]["test_images"] for r in results if "test_images" in (r["metrics"] or {})})
    text = (f"Every autoencoder is scored on the {', '.join(f'{t:,}' for t in tests)} images of the test split, "
            "whose species none of the training images share (the split is by species, data/README.md). The "
            "processor each run trained on is the one its `reproduce.json` records (`machines`); the same "
            "seed trains to other numbers on another processor.")
    header = ("configuration", "group", "seeds", "epochs", "learning rate", "training images an epoch", "processor")
    return ["## Setup", caption(results), text, _markdown(header, rows)]


def paper_section(paper, results, bounds):
    parts = ["## 1. The paper's comparison", "Each script at its defaults but for the budget's length.",
             _markdown(AUTOENCODER_HEADER, autoencoder_rows(paper))]
    runs = [r for config in paper.values() for r in config]
    epochs = sorted({r["metrics"]["epochs"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    text = (f"Conclusion: {_runs_text([{'seed': s} for s in seeds])}, "
            f"{'different lengths (' + ', '.join(map(str, epochs)) + ' epochs)' if len(epochs) > 1 else 'one length'}: "
            "by this report's rule no difference in this table is distinguishable, however large.")
    bits = sorted({r["metrics"]["bits_per_sprite"] for r in runs if r["metrics"]["bits_per_sprite"]})
    if len(bits) > 1:
        text += f" The largest code costs {bits[-1] / bits[0]:.0f} times the bits of the smallest."
    floor = bounds.get(runs[0]["config_json"].get("dataset"), {}).get("floor_sprite_exact")
    if floor is not None:
        at_floor = [r["label"] for r in runs if abs(r["metrics"]["sprite_exact_pixel_rate"] - floor) < 0.0005]
        if at_floor:
            text += (f" {', '.join(at_floor)} keeps {_percent(floor)} of sprite pixels exact: the one-colour floor "
                     f"(every sprite pixel {bounds[runs[0]['config_json']['dataset']]['floor_colour']}) to within 0.05 points.")
    return parts + [text]


def ablation_section(ablation):
    side_config = next(iter(ablation.values()))[0]["config_json"]
    side = code_grid_size(side_config)
    parts = [f"## 2. The ablation: a {side}x{side} grid of {side_config['num_embeddings']} codes of dimension "
             f"{side_config['embedding_dim']}, stage by stage", _markdown(AUTOENCODER_HEADER, autoencoder_rows(ablation)),
             "![the ablation, stage by stage (mean and sd over seeds)](ablation.png)"]
    runs = [r for config in ablation.values() for r in config]
    older = sorted({r["seed"] for r in runs if missing_keys(r, runs)})
    if older:
        lacking = sorted({k for r in runs for k in missing_keys(r, runs)})
        parts.append(f"Seed{'s' if len(older) > 1 else ''} {', '.join(map(str, older))} ran older code (its configs "
                     f"lack {', '.join(f'`{k}`' for k in lacking)}); the processors: {machines_of(runs)}. The mean ± sd "
                     "above mixes code and machine with the seed; the comparisons below leave those runs out.")
    stages = list(ablation.values())
    lines = [f"- {stage[0]['label']} against {stages[0][0]['label']}: " +
             " ".join(comparison_sentence(stage, stages[0], key) for key in ("ssim", "mse", "sprite_exact_pixel_rate", "fid"))
             for stage in stages[1:]]
    return parts + ["Conclusions, each stage against the first (same code, same length, seed ranges):", "\n".join(lines)]


def exact_section(exact, bounds):
    parts = ["## 3. Exact codes (bits per sprite count the palette)", _markdown(AUTOENCODER_HEADER, autoencoder_rows(exact)),
             "![sprite-pixel exactness and SSIM against bits per sprite](rate_exactness.png)"]
    dataset = next(iter(exact.values()))[0]["config_json"].get("dataset")
    bound = bounds.get(dataset)
    if bound is not None:
        rows = [["one colour everywhere (the floor)", "0", _percent(bound["floor_sprite_exact"])],
                *[[f"codes of the colour alone, {k} codes (at most)", "-", _percent(v)] for k, v in bound["colour_code_bound"].items()],
                ["indexed colour: a palette index a pixel and the palette", f"{bound['indexed_bits_mean']:.0f}", "100.0%"],
                ["lossless coder (best of indexed PNG and WebP)", f"{bound['lossless_bits_mean']:.0f}", "100.0%"]]
        parts += [f"What no learnt code is needed for, on the same {bound['test_images']:,} test images "
                  f"(`{BOUNDS_DIR}/{dataset}.json`: `{bound['command']}`, {bound['machine']}, {bound['date']}); "
                  f"mean bits per sprite. The lossless coder fits a {bound['budget_16x16']:.0f}-bit budget on "
                  f"{_percent(bound['lossless_within_budget'])} of the images.",
                  _markdown(("reference", "bits per sprite", "sprite exact pixels"), rows)]
        above = [runs for runs in exact.values()
                 if len(runs) > 1 and min(r["metrics"]["sprite_exact_pixel_rate"] for r in runs) > bound["floor_sprite_exact"]]
        parts.append(f"Above the floor of {_percent(bound['floor_sprite_exact'])} on every seed: "
                     + (", ".join(f"{runs[0]['label']} (lowest seed {_percent(min(r['metrics']['sprite_exact_pixel_rate'] for r in runs))})"
                                  for runs in above) or "none") + ".")
    pairs = [(exact[with_context], exact[without]) for with_context, without in
             (("exact_palette_context_pixel_vqvae", "exact_palette_pixel_vqvae"),
              ("exact_palette_context_per_pixel", "exact_palette_per_pixel")) if with_context in exact and without in exact]
    if pairs:
        parts += ["Palette context, each with against without:",
                  "\n".join("- " + " ".join(comparison_sentence(a, b, key) for key in ("sprite_exact_pixel_rate", "val_loss"))
                            for a, b in pairs)]
    return parts


def downstream_section(priors):
    parts = ["## 4. Downstream: the same PixelCNN prior over each model's codes", _markdown(PRIOR_HEADER, prior_rows(priors))]
    lines = []
    for runs in priors.values():
        nearest = _read(runs[0]["path"] / "samples" / "nearest.json") or []
        noisy = sum("__noise" in n["nearest_training_image"] for n in nearest)
        lines.append(f"- {runs[0]['label']}: {_runs_text(runs)}, {runs[0]['metrics']['epochs']} epoch(s); "
                     f"{noisy:,} of {len(nearest):,} samples have a training image on a noise background as their nearest.")
        if (runs[0]["path"] / "nearest_grid.png").is_file():
            parts.append(f"![{runs[0]['label']}: rows of samples over their nearest training images]"
                         f"({runs[0]['name']}/nearest_grid.png)")
    return parts + ["Conclusion: one prior a model, over one seed's model, so no FID difference here is "
                    "distinguishable; the share of samples on noise backgrounds differs between the priors and "
                    "moves FID on its own:", "\n".join(lines)]


def ood_section(results, bounds):
    parts = []
    for name, (images, rows) in ood_tables(results).items():
        parts += [f"## 5. Out of domain: the {images:,} test images of `{name}`, never trained on (bits per sprite "
                  "count that set's palettes)", _markdown(OOD_HEADER, rows)]
        bound = bounds.get(name)
        if bound is not None:
            scored = {}
            for r in results:
                if r["ood"] is not None and r["ood"]["set"] == name:
                    scored.setdefault(r["config"], []).append(r)
            above = [runs for runs in scored.values() if len(runs) > 1 and
                     min(r["ood"]["sprite_exact_pixel_rate"] for r in runs) > bound["floor_sprite_exact"]]
            parts.append(f"The floor there, every sprite pixel {bound['floor_colour']}, is "
                         f"{_percent(bound['floor_sprite_exact'])} (`{BOUNDS_DIR}/{name}.json`); indexed colour keeps "
                         f"every pixel at a mean {bound['indexed_bits_mean']:.0f} bits. Above the floor on every "
                         "seed scored: " + (", ".join(f"{runs[0]['label']} ({_runs_text(runs)})" for runs in above) or "none") + ".")
    return parts


# The goals set for a 16x16 tokenizer: (what, the value of a run, at least or at most, the bound).
BIT_BUDGET, BIT_BUDGET_WITH_PALETTE = 2560, 5120
PAPER_STACK = "tokenizer_paper_pixel_vqvae"  # the tokenizer group's baseline: the paper's encoder at the same length
TOKENIZER_GOALS = (
    ("reconstruction FID", fid_of, "at most", 5.0),
    ("SSIM", lambda r: r["metrics"]["ssim"], "at least", 0.95),
    ("palette-exact pixels", lambda r: r["metrics"]["palette_exact_pixel_rate"], "at least", 0.75),
    ("sprite exact pixels", lambda r: r["metrics"]["sprite_exact_pixel_rate"], "at least", 0.50),
    ("output colours over input colours", lambda r: r["metrics"]["output_colours"] / r["metrics"]["input_colours"],
     "at most", 1.2),
    ("share of the codebook in use on the test split", lambda r: r["metrics"].get("usage"), "at least", 0.90),
)


def goal_verdict(runs, value, side, bound):
    """'met on every seed', 'not met on any seed' or 'met on k of n seeds', with the values."""
    values = [value(r) for r in runs]
    met = [v is not None and (v >= bound if side == "at least" else v <= bound) for v in values]
    verdict = ("met on every seed" if all(met) else "not met on any seed" if not any(met)
               else f"met on {sum(met)} of {len(met)} seeds")
    shown = ", ".join("-" if v is None else f"{v:.3g}" for v in values)
    return f"{verdict} ({shown})"


def tokenizer_section(tokenizer):
    parts = ["## 6. The 16x16 tokenizer against its goals",
             _markdown(AUTOENCODER_HEADER, autoencoder_rows(tokenizer))]
    for config, runs in tokenizer.items():
        m = runs[0]["metrics"]
        bits = m["bits_per_sprite"]
        lines = [f"- {what} {side} {bound:g}: {goal_verdict(runs, value, side, bound)}"
                 for what, value, side, bound in TOKENIZER_GOALS]
        if draws_with_palette(runs[0]["config_json"]):
            code_bits = bits - BITS_PER_COLOUR * m["input_colours"]
            rate = (f"{bits:.0f} bits per sprite: {code_bits:.0f} of codes, {bits - code_bits:.0f} of the palette it "
                    f"draws with; codes within the {BIT_BUDGET:,}-bit budget: {'yes' if code_bits <= BIT_BUDGET else 'no'}, "
                    f"codes and palette within {BIT_BUDGET_WITH_PALETTE:,}: {'yes' if bits <= BIT_BUDGET_WITH_PALETTE else 'no'}.")
        else:
            with_palette = bits + m["palette_bits"]
            rate = (f"{bits:.0f} bits per sprite, all of codes (it carries no palette); within the {BIT_BUDGET:,}-bit "
                    f"budget: {'yes' if bits <= BIT_BUDGET else 'no'}; with the {m['palette_bits']:.0f} bits of the palette "
                    f"that palette-exact pixels snap to, {with_palette:.0f}, within {BIT_BUDGET_WITH_PALETTE:,}: "
                    f"{'yes' if with_palette <= BIT_BUDGET_WITH_PALETTE else 'no'}.")
        parts += [f"{runs[0]['label']} (`{config}`, {_runs_text(runs)}): {rate}", "\n".join(lines)]
    baseline = tokenizer.get(PAPER_STACK)
    others = [runs for config, runs in tokenizer.items() if config != PAPER_STACK]
    if baseline and others:
        parts += [f"Against {baseline[0]['label']} (same length, seed ranges):", "\n".join(
            f"- {runs[0]['label']}: " + " ".join(comparison_sentence(runs, baseline, key) for key in
                                               ("ssim", "mse", "sprite_exact_pixel_rate", "palette_exact_pixel_rate", "fid"))
            for runs in others)]
    return parts


GENERATION_HEADER = ("sprites", "seeds", "epochs", "test bits/code", "FID (floor)", "colours", "speckle rate",
                     "outline continuity", "nearest training MSE", "codes shared with nearest", "seconds for the samples")
# The bound on a prior's sample FID, as a multiple of the FID of as many real training sprites.
FLOOR_RATIO = 1.5
CLEAN_MEASURES = (("colours", "colours"), ("speckle_rate", "speckle rate"), ("outline_continuity", "outline continuity"))


def _clean_cell(runs, name, source=lambda m: m, digits=3):
    scores = [source(r["metrics"])["cleanliness"].get(name) for r in runs]
    text = _cell([s and s["mean"] for s in scores], digits)
    return text if not scores[0] else f"{text} ({scores[0]['p5']:.{digits}f}–{scores[0]['p95']:.{digits}f})"


def generation_rows(configs):
    rows = []
    for config, runs in configs.items():
        m = runs[0]["metrics"]
        real = lambda metrics: metrics["real"]
        fids = _cell([r["metrics"]["fid"] for r in runs], 1)
        floors = _cell([r["metrics"].get("floor_fid") for r in runs], 1)
        rows.append([f"{runs[0]['label']} (`{config}`, over `{runs[0]['overrides']['vq_experiment']}`), "
                     f"{m['num_samples']:,} samples", _runs_text(runs), str(m["epochs"]),
                     _cell([r["metrics"]["test_bits_per_code"] for r in runs], 3), f"{fids} ({floors})",
                     *[_clean_cell(runs, name) for name, _ in CLEAN_MEASURES],
                     _cell([r["metrics"]["nearest_mse_mean"] for r in runs], 5),
                     _cell([r["metrics"]["nearest_code_share_mean"] for r in runs], 1, 100, "%"),
                     _cell([r["metrics"]["draw_seconds"] for r in runs], 1)])
        rows.append([f"real: {m['real']['what']}", _runs_text(runs), "-", "-", "-",
                     *[_clean_cell(runs, name, real) for name, _ in CLEAN_MEASURES],
                     _cell([r["metrics"]["real"]["nearest_mse_mean"] for r in runs], 5),
                     _cell([r["metrics"]["real"]["nearest_code_share_mean"] for r in runs], 1, 100, "%"), "-"])
    return rows


def flattening_text(run):
    """How much the last epoch lowered the validation bits per code, from history.json."""
    history = _read(run["path"] / "history.json") or []
    if len(history) < 2:
        return f"seed {run['seed']}: one epoch, so no flattening can be judged"
    before, last = history[-2]["val_bits_per_code"], history[-1]["val_bits_per_code"]
    return f"seed {run['seed']}: {before:.4f} to {last:.4f} bits/code in the last epoch ({100 * (before - last) / before:.1f}% lower)"


def generation_section(generation):
    parts = ["## 7. New sprites from a prior over 16x16 codes",
             "Each prior draws its samples on white and black in turn, as the test split has each sprite on both. "
             "FID is against the test split; the floor beside it is the FID of as many training sprites on "
             "white and black, drawn at random: what a prior that drew real sprites would score at that count. "
             "Colours, speckle rate (sprite pixels no neighbour shares) and outline continuity (the share of "
             "the silhouette's edge drawn dark; on white only) are means with their 5th–95th percentile; the row "
             "below each prior measures real test sprites the same way. Nearest: the training sprite closest in "
             "pixels (MSE) and the training grid sharing most codes.",
             _markdown(GENERATION_HEADER, generation_rows(generation))]
    for config, runs in generation.items():
        lines = [f"- sample FID at most {FLOOR_RATIO} times the floor: " + goal_verdict(
                     runs, lambda r: r["metrics"]["fid"] / r["metrics"]["floor_fid"]
                     if r["metrics"].get("fid") and r["metrics"].get("floor_fid") else None, "at most", FLOOR_RATIO)
                 + " (the ratio)"]
        for name, label in CLEAN_MEASURES:
            inside = [r["metrics"]["real"]["cleanliness"][name]["p5"] <= r["metrics"]["cleanliness"][name]["mean"]
                      <= r["metrics"]["real"]["cleanliness"][name]["p95"] for r in runs]
            lines.append(f"- mean {label} inside the real sprites' 5th–95th percentile: on {sum(inside)} of {len(runs)} seeds")
        lines.append(f"- {runs[0]['metrics']['num_samples']:,} samples drawn and decoded in under a minute: "
                     + goal_verdict(runs, lambda r: r["metrics"]["draw_seconds"], "at most", 60) + " (seconds)")
        lines.append("- trained until flat: " + "; ".join(flattening_text(r) for r in runs))
        parts += [f"{runs[0]['label']} (`{config}`), {_runs_text(runs)}:", "\n".join(lines)]
        if (runs[0]["path"] / "nearest_grid.png").is_file():
            parts.append(f"![{runs[0]['label']}, seed {runs[0]['seed']}: rows of samples over their nearest "
                         f"training images]({runs[0]['name']}/nearest_grid.png)")
    return parts


def limits_section(results, ablation):
    ablation_labels = [runs[0]["label"] for runs in ablation.values()]
    lines = ["- Nothing here is at the paper's length: every run is at the budget above "
             f"({', '.join(sorted({r['budget'] for r in results}))}).",
             "- A seed range of two or three seeds is not a confidence interval; a difference called out above "
             "may still not hold at more seeds."]
    if ablation_labels and not any("VQ-VAE + SSIM" in label for label in ablation_labels):
        lines.append("- The SSIM term was run on the Pixel VQ-VAE only: no plain VQ-VAE trained with it, so what the "
                     "term does cannot be told apart from what the architecture does with it.")
    lines.append("- The priors' FIDs rest on one prior over one seed's model, each scored on 1,000 samples or fewer.")
    lines.append("- Sprites of other games are one set (the out-of-domain section), of tiles rather than sprites.")
    return ["## What this does not show", "\n".join(lines)]


def headline_block(results_dir):
    """The README's results table: a few rows, each from the published files, linked into results.md."""
    results = load_results(results_dir)
    bounds = load_bounds(results_dir)
    wanted = ("paper_pixel_vqvae", "paper_vqvae", "paper_vae", "ablation_vqvae", "ablation_pixel_vqvae_ssim",
              "exact_palette_pixel_vqvae", "exact_palette_per_pixel")
    configs = {}
    for group in ("paper", "ablation", "exact"):
        configs.update(by_config(results, group))
    rows = []
    for config in wanted:
        if config in configs:
            runs = configs[config]
            bits = runs[0]["metrics"]["bits_per_sprite"]
            rows.append([f"{runs[0]['group']}: {runs[0]['label']}", ", ".join(str(r["seed"]) for r in runs),
                         "-" if bits is None else f"{bits:,.0f}", str(runs[0]["metrics"]["epochs"]),
                         _cell([r["metrics"]["ssim"] for r in runs], 3),
                         _cell([r["metrics"]["sprite_exact_pixel_rate"] for r in runs], 1, 100, "%"),
                         _cell([fid_of(r) for r in runs], 1)])
    if "pokemon" in bounds:
        b = bounds["pokemon"]
        rows += [["reference: one colour everywhere (the floor)", "-", "0", "-", "-", _percent(b["floor_sprite_exact"]), "-"],
                 ["reference: indexed colour, nothing learnt", "-", f"{b['indexed_bits_mean']:,.0f}", "-", "1", "100.0%", "-"]]
    header = ("model", "seeds", "bits per sprite", "epochs", "SSIM", "sprite pixels exact", "FID")
    table = "\n".join("| " + " | ".join(row) + " |" for row in [list(header), [":--", ":--"] + ["--:"] * 5] + rows)
    return "\n".join([README_BEGIN, table, README_END])


def write_readme_block(readme, results_dir):
    """Replace the block between README_BEGIN and README_END of `readme` with `headline_block`."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{readme} has no {README_BEGIN} ... {README_END} block to write the results into")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with atomic_path(Path(readme)) as tmp:
        tmp.write_text(head + headline_block(results_dir) + tail)


def write_results(results_dir):
    """RESULTS/results.md and its figures, from the published experiments and RESULTS/bounds alone;
    returns its path."""
    results = load_results(results_dir)
    results_dir = Path(results_dir)
    if not results:
        raise UserError(f"{results_dir} holds no published experiment (no */{RUN_FILE}); run python -m utils.reproduce")
    bounds = load_bounds(results_dir)
    paper, ablation = by_config(results, "paper"), by_config(results, "ablation")
    priors, exact = by_config(results, "downstream"), by_config(results, "exact")
    tokenizer, generation = by_config(results, "tokenizer"), by_config(results, "generation")
    groups = {name: configs for name, configs in (("paper", paper), ("ablation", ablation), ("exact", exact),
                                                   ("downstream", priors), ("tokenizer", tokenizer),
                                                   ("generation", generation)) if configs}
    parts = ["# Results of `python -m utils.reproduce`",
             "Every number below is computed from the files in this folder by `python -m utils.reproduce "
             "--tables-only`. A difference is claimed only between runs of the same code and length whose seed "
             f"ranges (min to max) do not overlap; otherwise it is \"{SAME}\"."]
    parts += setup_section(results, groups)
    shown = [(f"{r['group']}: {r['label']}", *shown_images(r, results_dir / TEST_SPRITES)) for r in first_seeds(results)]
    if shown:
        reconstruction_figure(shown, results_dir / "reconstructions.png")
        parts.append("![the same test sprites (top row) reconstructed by every model, first seed](reconstructions.png)")
    if paper:
        parts += paper_section(paper, results, bounds)
    if ablation:
        parts += ablation_section(ablation)
        stages = [(runs[0]["label"], {name: spread([r["metrics"][key] for r in runs]) for name, key in ABLATION_BARS})
                  for runs in ablation.values()]
        ablation_figure(stages, results_dir / "ablation.png")
    points = [(f"{runs[0]['group']}: {runs[0]['label']}", runs[0]["metrics"]["bits_per_sprite"],
               spread([r["metrics"]["sprite_exact_pixel_rate"] for r in runs]),
               spread([r["metrics"]["ssim"] for r in runs])) for runs in [*paper.values(), *ablation.values(), *exact.values(),
                                                                              *tokenizer.values()]]
    drawn = rate_figure(points, results_dir / "rate_exactness.png")
    if exact:
        parts += exact_section(exact, bounds)
        if not drawn:
            parts = [p for p in parts if "rate_exactness.png" not in p]
    if priors:
        parts += downstream_section(priors)
    parts += ood_section(results, bounds)
    if tokenizer:
        parts += tokenizer_section(tokenizer)
    if generation:
        parts += generation_section(generation)
    parts += limits_section(results, ablation)
    parts += ["## Wall time of each experiment", _markdown(TIME_HEADER, time_rows(results))]
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
        if not is_prior(r) and r["metrics"] is not None and (r["path"] / SHOWN_DIR).is_dir():
            firsts.setdefault(r["config"], r)
    return list(firsts.values())


def shown_images(result, test_sprites):
    """(inputs, reconstructions) of the sprites shown for `result`, as uint8 arrays, paired by name."""
    names = sorted(p.name for p in (result["path"] / SHOWN_DIR).glob("*.png"))
    return (np.stack([load_rgb(Path(test_sprites) / n) for n in names]),
            np.stack([load_rgb(result["path"] / SHOWN_DIR / n) for n in names]))
