"""Reproduce the paper's comparison, the equal-capacity ablation and the downstream priors.

    python -m utils.reproduce                        # the cpu budget (about five hours), seeds 42,1,2
    python -m utils.reproduce --budget=paper         # the paper's length
    python -m utils.reproduce --only=ablation --dry-run
    python -m utils.reproduce --tables-only          # rebuild docs/results/results.md from docs/results/

Each experiment of `utils/reproduce/plan.py` runs through its training script's command line, its output in
OUTPUTS/<experiment>/ and its log in OUTPUTS/.reproduce/<experiment>.log. A finished experiment
(metrics.json, and a config.json equal to the plan's) is skipped, as is one published in RESULTS
by another machine, unless a prior still to run needs its weights; an unfinished one is resumed; a
folder whose config differs from the plan is refused before anything runs, and never overwritten.
As each autoencoder ends, the FID of its test reconstructions is computed (utils.report), it is
scored on the test split of an out-of-domain set never trained on (--ood, the Angband tiles once
prepared: python -m utils.data prepare --set angband), and its small files are copied into
RESULTS/<experiment>/ (never weights or reconstructions), from which RESULTS/results.md and its
figures are written at the end.
"""
import argparse
import functools
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

from utils.config import parse_config, seed_problem
from utils.device import choose_device, describe_machine
from utils.errors import UserError
from utils.fid_weights import resolve_fid_weights
from utils.io import make_folder, write_json
from utils.reconstruct import score_prepared_set
from utils.report import DEFAULT_FID, load_experiments, update_fids
from utils.reproduce import plan as planned
from utils.reproduce.results import OOD_FILE, RUN_FILE, publish, write_readme_block, write_results

ROOT = Path(__file__).resolve().parent.parent.parent
LOG_DIR = ".reproduce"  # a dot folder: utils.report and the scripts' folder checks pass it by
LOG_TAIL = 20
# Not part of what an experiment is: how this run of it was started.
RUN_KEYS = ("resume", "overwrite")
# Where this machine keeps outputs and weights: another machine's published run differs only there.
PLACE_KEYS = ("output_dir", "fid_weights")
DEFAULT_OOD = ROOT / "data" / "angband"
DEFAULT_RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"  # its results block is written from DEFAULT_RESULTS alone


@functools.cache
def script_defaults(script):
    """The config block of a training script, read without running the script."""
    return runpy.run_path(str(ROOT / script), run_name="utils.reproduce")["config"]


def _text(value):
    return str(value) if not isinstance(value, float) else repr(value)


def command_keys(entry, args):
    """Every key the script is given: the plan's overrides, then where its inputs and outputs are."""
    keys = {**entry["overrides"], "experiment_name": entry["name"], "output_dir": str(args.outputs),
            "dataset": args.dataset}
    if planned.is_prior(entry):
        keys.update(fid_dims=args.fid_dims, fid_weights=str(args.fid_weights or ""))
    return keys


def resolved_config(entry, args):
    """The config.json the run will write: the script's defaults under the plan's keys."""
    keys = command_keys(entry, args)
    return parse_config(script_defaults(entry["script"]), [f"--{k}={_text(v)}" for k, v in keys.items()])


def config_differences(saved, entry, args, ignored=RUN_KEYS):
    """The keys whose saved value is not the plan's, as one readable list ('' when none)."""
    wanted = resolved_config(entry, args)
    # A key the script gained after the experiment ran meant, then, its default.
    defaults = script_defaults(entry["script"])
    differ = [key for key in sorted(set(saved) | set(wanted)) if key not in ignored
              and saved.get(key, defaults.get(key)) != wanted.get(key)]
    return ", ".join(f"{k} (folder {saved.get(k)!r}, plan {wanted.get(k)!r})" for k in differ[:5])


def published_state(entry, args):
    """'published' where RESULTS holds this plan's finished experiment, else 'new'."""
    folder = args.results / entry["name"]
    needed = [folder / name for name in (RUN_FILE, "metrics.json", "config.json")]
    if not all(path.is_file() for path in needed):
        return "new"
    differ = config_differences(json.loads(needed[2].read_text()), entry, args, RUN_KEYS + PLACE_KEYS)
    if differ:
        raise UserError(f"{folder} holds a published experiment whose config differs from the plan's: {differ}; "
                        "it is not overwritten: move it away, or choose another --results or --budget")
    return "published"


def state(entry, args):
    """'new', 'resume', 'done', or 'published' (finished on another machine: only its small files
    are here), or raises UserError where a folder is not this plan's."""
    folder = args.outputs / entry["name"]
    if not folder.is_dir() or not any(folder.iterdir()):
        return published_state(entry, args)
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / "checkpoint.pt").exists():
            return "resume"  # the script checks the checkpoint's architecture against the plan
        raise UserError(f"{folder} holds files but no config.json: it is not an experiment of this plan; "
                        "move it away or choose another --outputs")
    differ = config_differences(json.loads(config_path.read_text()), entry, args)
    if differ:
        raise UserError(f"{folder} holds an experiment whose config differs from the plan's: {differ}; "
                        "it is not overwritten: move it away, or choose another --outputs or --budget")
    return "done" if (folder / "metrics.json").exists() else "resume"


def plan_states(entries, args):
    """Each entry's state; a published experiment that an unfinished one needs is trained again,
    since what it needs (the VQ model's weights) is not published."""
    states = {e["name"]: state(e, args) for e in entries}
    for entry in entries:
        if states[entry["name"]] not in ("done", "published"):
            for need in entry["needs"]:
                if states[need] == "published":
                    states[need] = "new"
    return states


def selected(entries, only):
    """The entries of the groups in `only` (all when empty) and every entry they need, in plan order."""
    groups = set(only) if only else {e["group"] for e in entries}
    unknown = groups - {e["group"] for e in entries}
    if unknown:
        raise UserError(f"--only names unknown group(s) {', '.join(sorted(unknown))}; "
                        f"the groups are {', '.join(dict.fromkeys(e['group'] for e in entries))}")
    wanted = {e["name"] for e in entries if e["group"] in groups}
    for e in reversed(entries):
        if e["name"] in wanted:
            wanted.update(e["needs"])
    return [e for e in entries if e["name"] in wanted]


def recorded_timing(logs, name):
    """Wall seconds and attempts of `name` so far (None if this command never ran it). Wall time
    is kept over every attempt, so a resumed experiment's total includes its interrupted runs; one
    killed with this command (a session's end) never came back to be timed, and counts as running
    until its script last wrote to the log."""
    path = logs / f"{name}.json"
    if not path.exists():
        return None
    timing = json.loads(path.read_text())
    if "running_since" in timing:
        since = timing.pop("running_since")
        log = logs / f"{name}.log"
        timing["wall_seconds"] += max(0.0, log.stat().st_mtime - since) if log.exists() else 0.0
        timing["attempts"] += 1
    return timing


def run_one(entry, status, args):
    """Train one experiment through its script's command line; returns its exit status."""
    keys = command_keys(entry, args)
    command = [sys.executable, entry["script"], *[f"--{k}={_text(v)}" for k, v in keys.items()]]
    if status == "resume":
        command.append("--resume=True")
    logs = args.outputs / LOG_DIR
    make_folder(logs)
    log = logs / f"{entry['name']}.log"
    timing_path = logs / f"{entry['name']}.json"
    timing = recorded_timing(logs, entry["name"]) or {"wall_seconds": 0.0, "attempts": 0}
    # The processor too: a rerun on another one trains to other numbers (float rounding differs).
    timing["machines"] = sorted({*timing.get("machines", []),
                                 describe_machine(choose_device(resolved_config(entry, args)["device"]))})
    write_json(timing_path, {**timing, "running_since": time.time()})
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    write_json(timing_path, {**timing, "wall_seconds": timing["wall_seconds"] + seconds,
                             "attempts": timing["attempts"] + 1})
    if done.returncode:
        tail = log.read_text().splitlines()[-LOG_TAIL:]
        print("\n".join(tail), file=sys.stderr)
        print(f"error: {entry['name']} stopped with exit status {done.returncode} after {seconds:.0f} s; "
              f"its log is {log}; run the same command again to resume it", file=sys.stderr)
    return done.returncode


def score_out_of_domain(entry, args):
    """The autoencoder's scores on the out-of-domain test split, kept in its folder (cached per set)."""
    path = args.outputs / entry["name"] / OOD_FILE
    if path.is_file() and json.loads(path.read_text()).get("set") == args.ood.name:
        return
    device = choose_device(resolved_config(entry, args)["device"])
    try:
        scores = score_prepared_set(args.outputs / entry["name"], args.ood, device)
    except UserError as err:
        # The run itself is sound: publish it, unscored out of domain, and say why.
        print(f"warning: {entry['name']} is not scored on {args.ood}: {err}", file=sys.stderr)
        return
    write_json(path, scores)
    print(f"    {args.ood.name}: {100 * scores['sprite_exact_pixel_rate']:.1f}% of sprite pixels exact, "
          f"SSIM {scores['ssim']:.3f}", flush=True)


def finish(entry, args):
    """FID of an autoencoder's reconstructions (cached) and its out-of-domain scores, then its small
    files into the results."""
    timing_path = args.outputs / LOG_DIR / f"{entry['name']}.json"
    # An experiment trained outside this command has no wall time of ours.
    timing = recorded_timing(args.outputs / LOG_DIR, entry["name"]) or {"wall_seconds": None, "attempts": 0}
    if not planned.is_prior(entry) and args.ood is not None:
        score_out_of_domain(entry, args)
    if not planned.is_prior(entry) and not args.no_fid:
        cached = (args.outputs / entry["name"] / "fid.json").exists()
        started = time.perf_counter()
        experiments = [e for e in load_experiments(args.outputs) if e.name == entry["name"]]
        update_fids(experiments, args.outputs, args.fid_weights, DEFAULT_FID[0], args.fid_dims)
        if not cached:
            # Inception on 3,816 images costs the CPU as much as a short training run.
            timing["fid_seconds"] = time.perf_counter() - started
            if timing_path.exists():
                write_json(timing_path, timing)
    publish(args.outputs / entry["name"], args.results / entry["name"],
            {**entry, "budget": args.budget, "fid_dims": args.fid_dims, **timing})


def describe(entry, status):
    estimate = "" if entry["estimate_minutes"] is None else f", about {entry['estimate_minutes']} min"
    return f"{entry['name']} ({entry['group']}, {entry['script']}{estimate}): {status}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m utils.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(planned.BUDGETS), default="cpu")
    parser.add_argument("--seeds", default=",".join(map(str, planned.SEEDS)),
                        help="comma-separated; the first also seeds the paper group (cpu, smoke) and the priors")
    parser.add_argument("--only", default="", help="comma-separated groups: paper, ablation, downstream")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and each experiment's state only")
    parser.add_argument("--tables-only", action="store_true",
                        help="rebuild RESULTS/results.md and its figures from RESULTS alone; run nothing")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--dataset", default="pokemon", help="'pokemon' or a prepared data folder")
    parser.add_argument("--fid-weights", type=Path, default=None, metavar="PATH",
                        help="FID Inception weights (default: as python -m utils.fid)")
    parser.add_argument("--fid-dims", type=int, default=DEFAULT_FID[1], choices=(64, 192, 768, 2048))
    parser.add_argument("--no-fid", action="store_true",
                        help="compute no FID of reconstructions (a prior still scores its samples, as its script does)")
    parser.add_argument("--ood", type=Path, default=DEFAULT_OOD, metavar="FOLDER",
                        help="a prepared set never trained on, whose test split scores every autoencoder "
                             "(default: data/angband, where prepared)")
    parser.add_argument("--no-ood", action="store_true", help="score no autoencoder out of domain")
    args = parser.parse_args(argv)
    args.outputs, args.results = args.outputs.resolve(), args.results.resolve()
    args.ood = None if args.no_ood else args.ood.resolve()
    if args.dataset != "pokemon":
        args.dataset = str(Path(args.dataset).resolve())
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    bad = [seed for seed in args.seeds if seed_problem(seed)]
    if bad:
        parser.error(f"--seeds must each be {seed_problem(bad[0])}, got {bad[0]}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    args.only = [group for group in args.only.split(",") if group]
    return args


def reproduce(args):
    """Run what is not finished; returns the exit status."""
    if args.tables_only:
        print(f"wrote {write_results(args.results)}")
        if args.results == DEFAULT_RESULTS.resolve():
            write_readme_block(README, args.results)
            print(f"wrote the results block of {README}")
        return 0
    if args.fid_weights is not None:
        resolve_fid_weights(args.fid_weights)
    if args.ood is not None and not (args.ood / "manifest.json").is_file():
        if args.ood != DEFAULT_OOD:
            raise UserError(f"--ood {args.ood} is not a prepared set (no manifest.json); prepare it with "
                            "python -m utils.data prepare, or leave --ood out")
        print(f"{args.ood} is not prepared (python -m utils.data prepare --set angband): no autoencoder is "
              "scored out of domain")
        args.ood = None
    entries = selected(planned.plan(args.budget, args.seeds, script_defaults), args.only)
    states = plan_states(entries, args)
    total = sum(e["estimate_minutes"] or 0 for e in entries if states[e["name"]] not in ("done", "published"))
    print(f"{len(entries)} experiments at the {args.budget} budget, seeds {','.join(map(str, args.seeds))}"
          + (f"; about {total / 60:.1f} h to run on an idle 2-core CPU" if total else ""))
    for number, entry in enumerate(entries, 1):
        status = states[entry["name"]]
        print(f"[{number}/{len(entries)}] {describe(entry, status)}", flush=True)
        if args.dry_run:
            continue
        if status == "published":
            continue
        if status != "done":
            code = run_one(entry, status, args)
            if code:
                return code
        finish(entry, args)
    if args.dry_run:
        return 0
    print(f"wrote {write_results(args.results)}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return reproduce(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

