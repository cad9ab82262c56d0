"""Compare every experiment under an outputs folder: markdown tables, and what evaluate.ipynb reads.

Autoencoders (the three training scripts) and PixelCNN priors over their codes (train_pixelcnn.py)
get a table each. The FID of each autoencoder's test reconstructions against the test split is
computed once, when missing, and cached in the experiment's fid.json; the test split's Inception
statistics are cached in the outputs folder's .fid/.

    python -m utils.report                  # writes outputs/report.md and prints the table
    python -m utils.report --outputs DIR --no-fid
"""
import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np

from utils.data.prepare import DATA, ROOT
from utils.errors import UserError, exit_on_user_error
from utils.fid import fid_statistics, frechet_distance, load_fid_inception, load_statistics, save_statistics
from utils.fid_weights import resolve_fid_weights, sha1_of, weights_record
from utils.io import atomic_path, write_json
from utils.metrics import code_grid_size, code_histogram_size

# The experiment each training script writes by default, in the paper's order.
DEFAULT_EXPERIMENTS = {"vae": "train_vae.py", "vqvae": "train_vqvae.py", "pixel_vqvae": "train_pixel_vqvae.py"}
FIGURES = {"reconstructions": "reconstruction_grid.png", "fusions": "fusions/overview.png",
           "samples": "samples.gif"}
PRIOR_FIGURES = {"samples": "sample_grid.png", "nearest training images": "nearest_grid.png"}
HEADER = ("experiment", "model", "epochs", "training images seen", "test MSE", "SSIM", "PSNR",
          "exact pixels", "sprite exact pixels", "colours out / in", "codes used", "FID", "train seconds",
          "images/s")
FID_FILE = "fid.json"
# The paper's FID: pytorch-fid's bilinear resize and final-pool features.
DEFAULT_FID = ("bilinear", 2048)
PRIOR_HEADER = ("prior", "codes of", "epochs", "training grids", "val bits/code", "test bits/code",
                "uniform bits/code", "nearest training image MSE (mean)", "duplicates: pixels / codes",
                "FID", "train seconds")


def _align(header):
    return (":--", ":--") + ("--:",) * (len(header) - 2)


def _read_json(path, kind=dict):
    """The JSON object (or with `kind` list, array) held in `path`, or None when there is no such file."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON {'object' if kind is dict else 'list'}")
    return value


def _numbers(path, mapping, keys, optional=()):
    """Refuse a file whose numbers a table needs are missing or not numbers, naming the first."""
    for key in keys:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) or (key in optional and value is None)):
            raise UserError(f"{path} lacks or mangles {key!r}: a number is expected, got {value!r}")


@dataclasses.dataclass
class Experiment:
    """What one training run left in its folder; `metrics` is None until the run has finished."""
    path: Path
    config: dict
    metrics: dict | None
    history: list

    @property
    def name(self):
        return self.path.name

    @property
    def is_prior(self):
        return "vq_experiment" in self.config

    @property
    def is_vq(self):
        return "num_embeddings" in self.config

    @property
    def model(self):
        """The model in the paper's words and the shape of its latent, e.g. 'Pixel VQ-VAE, 64x64 codes'."""
        c = self.config
        if not c:
            return "unknown (no config.json)"
        _numbers(self.path / "config.json", c, ["image_size", "num_layers"] + ([] if self.is_vq else ["latent_dim"]))
        if not self.is_vq:
            return f"VAE, {c['latent_dim']}-d latent"
        side = code_grid_size(c)
        pixel = c.get("adapter_layer") or c.get("pixelsight_filters", 0) > 0
        quantizer = {"residual": f", residual x{c.get('residual_depth')}",
                     "fsq": f", FSQ {c.get('fsq_levels')}"}.get(c.get("quantizer", "ema"), "")
        return f"{'Pixel VQ-VAE' if pixel else 'VQ-VAE'}, {side}x{side} codes{quantizer}"


def _load_all(outputs_dir):
    """Every experiment folder under `outputs_dir`: the three default ones first, then by name."""
    outputs_dir = Path(outputs_dir)
    hint = "train a model first, e.g. python train_pixel_vqvae.py"
    if not outputs_dir.is_dir():
        raise UserError(f"outputs folder {outputs_dir} does not exist; {hint}")
    folders = [p for p in outputs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise UserError(f"outputs folder {outputs_dir} holds no experiments; {hint}")
    order = list(DEFAULT_EXPERIMENTS)
    folders.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    return [Experiment(p, _read_json(p / "config.json") or {}, _read_json(p / "metrics.json"),
                       _read_json(p / "history.json", list) or []) for p in folders]


def load_experiments(outputs_dir):
    """The autoencoder experiments under `outputs_dir`: the three default ones first, then by name."""
    return [e for e in _load_all(outputs_dir) if not e.is_prior]


def load_priors(outputs_dir):
    """The PixelCNN priors under `outputs_dir`, by name."""
    return [e for e in _load_all(outputs_dir) if e.is_prior]


def _percent(rate):
    return f"{100 * rate:.1f}%"


def _row(e):
    if e.metrics is None:
        return [e.name, e.model, "unfinished"] + [""] * (len(HEADER) - 3)
    m = e.metrics
    _numbers(e.path / "metrics.json", m, ["epochs", "mse", "ssim", "psnr", "exact_pixel_rate", "sprite_exact_pixel_rate",
                                          "output_colours", "input_colours", "train_seconds",
                                          "train_images_per_second"] + (["codes_used"] if e.is_vq else []))
    for row in e.history:
        _numbers(e.path / "history.json", row, ["train_images"])
    codes = f"{m['codes_used']}/{code_histogram_size(e.config)}" if e.is_vq else "-"
    cached = cached_fid(e)
    return [e.name, e.model, str(m["epochs"]), str(sum(row["train_images"] for row in e.history)),
            f"{m['mse']:.5f}", f"{m['ssim']:.4f}", f"{m['psnr']:.2f}", _percent(m["exact_pixel_rate"]),
            _percent(m["sprite_exact_pixel_rate"]), f"{m['output_colours']:.1f} / {m['input_colours']:.1f}",
            codes, "-" if cached is None else f"{cached['fid']:.2f}", f"{m['train_seconds']:.1f}",
            f"{m['train_images_per_second']:.0f}"]


def _prior_row(e, models):
    vq = e.config["vq_experiment"]
    codes_of = f"{vq} ({models[vq]})" if vq in models else vq
    if e.metrics is None:
        return [e.name, codes_of, "unfinished"] + [""] * (len(PRIOR_HEADER) - 3)
    m = e.metrics
    _numbers(e.path / "metrics.json", m, ["epochs", "train_grids", "val_bits_per_code", "test_bits_per_code",
                                          "uniform_bits_per_code", "nearest_mse_mean", "duplicate_share",
                                          "code_duplicate_share", "fid", "train_seconds"],
             optional=("val_bits_per_code", "fid"))
    val = "-" if m["val_bits_per_code"] is None else f"{m['val_bits_per_code']:.3f}"
    return [e.name, codes_of, str(m["epochs"]), str(m["train_grids"]), val, f"{m['test_bits_per_code']:.3f}",
            f"{m['uniform_bits_per_code']:.0f}", f"{m['nearest_mse_mean']:.5f}",
            f"{_percent(m['duplicate_share'])} / {_percent(m['code_duplicate_share'])}",
            "-" if m["fid"] is None else f"{m['fid']:.1f}", f"{m['train_seconds']:.1f}"]


def _markdown(header, rows):
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, _align(header)] + rows)


def _table(experiments):
    return _markdown(HEADER, [_row(e) for e in experiments])


def prior_table(outputs_dir):
    """The markdown table of every PixelCNN prior under `outputs_dir`, naming the VQ model it models."""
    models = {e.name: e.model for e in load_experiments(outputs_dir)}
    return _markdown(PRIOR_HEADER, [_prior_row(e, models) for e in load_priors(outputs_dir)])


def report_table(outputs_dir):
    """The markdown table of every experiment under `outputs_dir`, unfinished ones marked so."""
    return _table(load_experiments(outputs_dir))


def _figure_links(experiments):
    """Per finished experiment, links to its figures relative to the outputs folder."""
    lines = []
    for e in experiments:
        figures = PRIOR_FIGURES if e.is_prior else FIGURES
        links = [f"[{label}]({quote(f'{e.name}/{file}')})" for label, file in figures.items()
                 if (e.path / file).exists()]
        if e.metrics is not None and links:
            lines.append(f"- **{e.name}**: " + ", ".join(links))
    return "\n".join(lines)


def _fid_key(e, resize, dims):
    """What a cached FID belongs to: this run's metrics (rewritten by every run) and reconstructions."""
    count = sum(1 for _ in (e.path / "reconstructions").glob("*.png"))
    return {"resize": resize, "dims": dims, "metrics_sha1": sha1_of(e.path / "metrics.json"),
            "reconstructions": count}


def cached_fid(e, resize=DEFAULT_FID[0], dims=DEFAULT_FID[1]):
    """The cached FID record of `e`'s reconstructions for this measure, or None if none is current."""
    if e.metrics is None or e.is_prior or not (e.path / "reconstructions").is_dir():
        return None
    record = (_read_json(e.path / FID_FILE) or {}).get(f"{resize}-{dims}")
    return record if record is not None and record.get("key") == _fid_key(e, resize, dims) else None


def reference_statistics(e, model, weights, resize, dims, cache_dir):
    """FidStats of the test split `e` was scored on, computed once per split, weights and measure."""
    folder = reference_dir(e.config)
    manifest = folder.parent / "manifest.json"
    key = json.dumps([str(folder.resolve()), sha1_of(manifest) if manifest.is_file() else None,
                      weights.sha1, resize, dims])
    path = Path(cache_dir) / f"test-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        return load_statistics(path)
    stats = fid_statistics(folder, model, resize=resize)
    save_statistics(stats, path)
    return stats


def update_fids(experiments, outputs_dir, weights=None, resize=DEFAULT_FID[0], dims=DEFAULT_FID[1], log=print):
    """Compute and cache the FID of every finished experiment's reconstructions that has none yet."""
    todo = [e for e in experiments if not e.is_prior and e.metrics is not None
            and (e.path / "reconstructions").is_dir() and cached_fid(e, resize, dims) is None]
    if not todo:
        return
    try:
        weights = resolve_fid_weights(weights)
        model = load_fid_inception(weights, dims)
    except UserError as err:
        # The rest of the report does not need the network.
        log(f"warning: no FID for {len(todo)} experiment(s): {err}")
        return
    for e in todo:
        log(f"FID of {e.name}'s reconstructions against {reference_dir(e.config)} ({resize}, {dims}-d)")
        reference = reference_statistics(e, model, weights, resize, dims, Path(outputs_dir) / ".fid")
        ours = fid_statistics(e.path / "reconstructions", model, resize=resize)
        records = _read_json(e.path / FID_FILE) or {}
        records[f"{resize}-{dims}"] = {
            "fid": frechet_distance(ours.mu, ours.sigma, reference.mu, reference.sigma),
            "reconstructions": ours.count, "reference": str(reference_dir(e.config)), "reference_images":
            reference.count, "weights": weights_record(weights), "key": _fid_key(e, resize, dims)}
        write_json(e.path / FID_FILE, records)


def write_report(outputs_dir, fid=True, fid_weights=None):
    """Write `outputs_dir`/report.md: the tables, then links to every experiment's figures.

    With `fid`, first computes the FID of reconstructions that have none cached. Returns the
    autoencoders' table, followed by the priors' when there are any."""
    experiments, priors = load_experiments(outputs_dir), load_priors(outputs_dir)
    if fid:
        update_fids(experiments, outputs_dir, fid_weights)
    table = _table(experiments)
    if priors:
        table += f"\n\n## Priors over VQ codes\n\n{prior_table(outputs_dir)}"
    text = f"# Experiments\n\n{table}\n\n## Figures\n\n{_figure_links(experiments + priors)}\n"
    with atomic_path(Path(outputs_dir) / "report.md") as tmp:
        tmp.write_text(text)
    return table


def reference_dir(config):
    """The folder of test images that an experiment's reconstructions pair with by name."""
    dataset = config.get("dataset", "pokemon")
    return (DATA / "pokemon" if dataset == "pokemon" else ROOT / dataset) / "test"


def shared_sprites(experiments, count):
    """Up to `count` test sprite names that every experiment reconstructed.

    The first experiment's fusion pairs come first: they are unaugmented and on white, so the
    sprite itself is compared rather than a rotation's stair-stepped edges."""
    if not experiments:
        return []
    common = set.intersection(*({p.name for p in (e.path / "reconstructions").glob("*.png")}
                                for e in experiments))
    pairs = _read_json(experiments[0].path / "fusions" / "pairs.json", list) or []
    preferred = [name for pair in pairs for name in (pair["a"], pair["b"])]
    return [name for name in dict.fromkeys(preferred + sorted(common)) if name in common][:count]


def worst_window(error, size):
    """(top, left) of the size x size window of an [H, W] error map with the largest total error."""
    # Summed-area table: every window's total from four corners, without a loop over windows.
    total = np.pad(np.asarray(error, np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = total[size:, size:] - total[:-size, size:] - total[size:, :-size] + total[:-size, :-size]
    top, left = np.unravel_index(np.argmax(sums), sums.shape)
    return int(top), int(left)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs",
                        help="folder of experiments (default: outputs/ of this repository)")
    parser.add_argument("--no-fid", action="store_true",
                        help="show cached FIDs only; compute none (each takes minutes on a CPU)")
    parser.add_argument("--fid-weights", type=Path, default=None, metavar="PATH",
                        help="FID Inception weights (default: as python -m utils.fid)")
    args = parser.parse_args(argv)

    def run():
        print(write_report(args.outputs, fid=not args.no_fid, fid_weights=args.fid_weights))
        print(f"wrote {args.outputs / 'report.md'}")
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
