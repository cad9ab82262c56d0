"""The README and docs say what the repository does now, and every number they show comes from a file.

Words are counted as whitespace-separated tokens of README.md, code blocks and tables included.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.config import parse_config
from utils.reproduce.results import (README_BEGIN, README_END, SAME, TOKENIZER_GOALS, compare, goal_verdict,
                                     headline_block, write_results)
from utils.reproduce.run import script_defaults

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"
README_WORDS = 1500
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"]
LINKED = [*DOCS, ROOT / "data" / "README.md", ROOT / "original_data" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Past work does not belong in a reference: issue numbers, commit hashes, notes on earlier states.
ISSUE = re.compile(r"\bissues? #?\d+|(?<![\w&#])#\d{1,4}\b", re.IGNORECASE)
# A hex part of a file name (`pt_inception-2015-12-05-6726825d.pth`) names a file, not a commit.
HEX = re.compile(r"(?<![-\w])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![-.\w])")
PAST = re.compile(r"earlier versions?|still to run|earlier sessions?", re.IGNORECASE)


def readme_commands():
    """Each `python ...` line of the README's bash blocks, as its argument list."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line.split()[1:] for line in lines if line.startswith("python ")]


def pinned_checksums():
    """Hex strings the code pins (file checksums, such as the FID weights'): reference, not history."""
    return {match for path in (ROOT / "utils").glob("*.py") for match in HEX.findall(path.read_text())}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{path.name} links to missing {target}"


def test_every_training_command_in_the_readme_is_accepted_by_its_config_block():
    scripts = [argv for argv in readme_commands() if argv[0].endswith(".py")]
    assert scripts
    for argv in scripts:
        keys = [arg for arg in argv[1:] if arg.startswith("--") and arg != "--help"]
        parse_config(script_defaults(argv[0]), keys)  # a UserError names an unknown key or a bad value


def test_every_module_command_in_the_readme_takes_each_of_its_flags():
    modules = {}
    for argv in readme_commands():
        if argv[0] == "-m":
            modules.setdefault(argv[1], set()).update(arg.split("=")[0] for arg in argv[2:] if arg.startswith("--"))
    assert "utils.reproduce" not in modules or modules
    for module, flags in modules.items():
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(flag in done.stdout for flag in flags), (module, flags)


def test_the_readme_stays_within_its_word_budget():
    assert len(README.read_text().split()) <= README_WORDS


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_issue_numbers_commit_hashes_or_notes_on_past_work(path):
    text = path.read_text()
    assert not ISSUE.findall(text)
    assert not set(HEX.findall(text)) - pinned_checksums()
    assert not PAST.findall(text)


def test_the_readme_results_block_is_what_utils_results_writes_from_the_published_files():
    text = README.read_text()
    block = README_BEGIN + text.split(README_BEGIN, 1)[1].split(README_END, 1)[0] + README_END
    assert block == headline_block(RESULTS)


def test_results_md_is_what_utils_results_writes_from_the_published_files(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    assert write_results(copy).read_text() == (RESULTS / "results.md").read_text()


def run_with(**metrics):
    return {"metrics": metrics, "fid": None}


@pytest.mark.parametrize("values, verdict", [((0.96, 0.97), "met on every seed (0.96, 0.97)"),
                                             ((0.94, 0.96), "met on 1 of 2 seeds (0.94, 0.96)"),
                                             ((0.90, 0.949), "not met on any seed (0.9, 0.949)")])
def test_a_tokenizer_goal_is_met_only_where_each_seed_meets_it(values, verdict):
    _, value, side, bound = next(goal for goal in TOKENIZER_GOALS if goal[0] == "SSIM")
    assert goal_verdict([run_with(ssim=v) for v in values], value, side, bound) == verdict


def test_an_at_most_goal_and_a_missing_value_are_not_met():
    _, value, side, bound = next(goal for goal in TOKENIZER_GOALS if goal[0].startswith("output colours"))
    runs = [run_with(output_colours=12, input_colours=10), run_with(output_colours=13, input_colours=10)]
    assert goal_verdict(runs, value, side, bound) == "met on 1 of 2 seeds (1.2, 1.3)"
    _, usage, side, bound = next(goal for goal in TOKENIZER_GOALS if goal[0].startswith("share of the codebook"))
    assert goal_verdict([run_with()], usage, side, bound) == "not met on any seed (-)"


def seed_run(seed, ssim, keys=("learning_rate",), script="train_vqvae.py"):
    config = {key: 0.001 for key in keys}
    return {"seed": seed, "script": script, "config_json": config, "label": script,
            "metrics": {"ssim": ssim, "epochs": 3}}


def test_only_runs_of_the_newest_code_among_those_compared_count():
    a = [seed_run(1, 0.90), seed_run(2, 0.91)]
    b = [seed_run(1, 0.80), seed_run(2, 0.81)]
    later = seed_run(42, 0.99, keys=("learning_rate", "architecture"))
    assert compare(a, b, "ssim")["verdict"] == "better"
    outcome = compare([*a, later], b, "ssim")
    assert (outcome["verdict"], outcome["dropped"]) == (SAME, [1, 2])
    assert outcome["reason"] == "fewer than two seeds of the same code"
