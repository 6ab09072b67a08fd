"""The docs cannot drift from the code: every flag/default table in the README and docs/ names real flags of
`hf-lowrank pretrain` with the defaults its argument dataclasses give, and the defaults one setting has in two
layers (command line and library) agree."""

import inspect
import re
from pathlib import Path

import pytest

from hf_lowrank.optim import DEFAULT_ADAMW_LR, build_optimizer
from hf_lowrank.optim.hyperparameters import SpectronHyperparameters
from hf_lowrank.training.arguments import (
    DEFAULT_LEARNING_RATES,
    OptimizerArguments,
    RunArguments,
    resolve_learning_rate,
)
from hf_lowrank.training.diagnostics import LossSpikeDetector
from hf_lowrank.training.guards import StepGuard
from hf_lowrank.training.pretrain import parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TABLE_HEADER = "| flag | default | meaning |"
UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def flag_tables(path: Path) -> list[tuple[int, list[str], str, str]]:
    """``(line number, flags, default cell, meaning cell)`` of every row of every flag/default table in ``path``."""
    rows, in_table = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() == TABLE_HEADER:
            in_table = True
            continue
        if not in_table or line.startswith("| ---"):
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        flags_cell, default_cell, meaning = (cell.strip() for cell in line.strip().strip("|").split(" | ", 2))
        rows.append((number, re.findall(r"`--([a-z0-9_]+)`", flags_cell), default_cell, meaning))
    return rows


ROWS = [(f"{path.name}:{row[0]}", *row[1:]) for path in DOCS for row in flag_tables(path)]


def parse_literal(text: str):
    """A default as the docs write it: ``off``/``on``, a `backticked` string, a number with an optional unit;
    anything else (``per optimizer``, ``built-in corpus``, ...) describes a default resolved at run time: None."""
    text = text.strip()
    if text in ("off", "on"):
        return text == "on"
    if text.startswith("`") and text.endswith("`"):
        return text.strip("`")
    match = re.fullmatch(r"([0-9.e+-]+)(?: ?(kB|MB|GB))?", text)
    if match is None:
        return None
    value = float(match.group(1)) * UNITS.get(match.group(2), 1)
    return int(value) if value.is_integer() and "." not in match.group(1) and "e" not in match.group(1) else value


@pytest.fixture(scope="module")
def defaults(tmp_path_factory) -> tuple[dict, dict]:
    """``(raw, resolved)``: every `hf-lowrank pretrain` flag's dataclass default, and its value once the run has
    filled in the defaults that depend on other flags (the learning rates)."""
    args = parse_args(["--output_dir", str(tmp_path_factory.mktemp("out"))])
    raw = {name: value for group in args for name, value in vars(group).items()}
    training_args, optimizer_args = args[-1], args[2]
    resolve_learning_rate(training_args, optimizer_args)
    resolved = {name: value for group in args for name, value in vars(group).items()}
    return raw, resolved


def test_the_docs_have_flag_tables():
    assert {row[0].split(":")[0] for row in ROWS} >= {"README.md", "reliability.md"}
    assert len(ROWS) >= 15


@pytest.mark.parametrize("where, flags, default, meaning", ROWS, ids=[row[0] for row in ROWS])
def test_flag_table_row_matches_the_argument_dataclasses(where, flags, default, meaning, defaults):
    raw, resolved = defaults
    assert flags, f"{where}: no `--flag` in the first cell"
    unknown = [flag for flag in flags if flag not in raw]
    assert not unknown, f"{where}: {unknown} are not flags of hf-lowrank pretrain"
    cells = [cell.strip() for cell in default.split(", ")]
    if len(cells) != len(flags):  # one description for a group of flags: each is resolved at run time
        assert len(cells) == 1 and parse_literal(cells[0]) is None, f"{where}: {len(flags)} flags, defaults {cells}"
        assert all(raw[flag] is None for flag in flags), f"{where}: {default!r} but {[raw[f] for f in flags]}"
        return
    for flag, cell in zip(flags, cells):
        documented = parse_literal(cell)
        if documented is None:  # a description: the dataclass leaves it unset and the run resolves it
            assert raw[flag] is None, f"{where}: --{flag} is documented as {cell!r} but defaults to {raw[flag]!r}"
        else:
            assert documented == resolved[flag], f"{where}: --{flag} is documented as {cell!r}, not {resolved[flag]!r}"


def test_documented_learning_rate_defaults_are_the_codes():
    (row,) = [row for row in ROWS if row[1] == ["learning_rate"]]
    documented = [float(x) for x in re.findall(r"\(default ([0-9.e+-]+)\)", row[3])]  # Spectron's, then AdamW's
    assert documented == [DEFAULT_LEARNING_RATES["spectron"], DEFAULT_LEARNING_RATES["adamw"]], row[0]


def test_each_setting_has_one_default_in_every_layer():
    """The command line and the library give the same defaults (they once said 3e-3/1e-3 and 50/100)."""
    run = RunArguments()
    detector = inspect.signature(LossSpikeDetector).parameters
    for field, parameter in (
        ("spike_window", "window"),
        ("spike_threshold", "threshold"),
        ("spike_min_increase", "min_increase"),
        ("spike_warmup", "warmup"),
    ):
        assert getattr(run, field) == detector[parameter].default, field
    guard = inspect.signature(StepGuard).parameters
    for field in ("max_consecutive_nonfinite", "max_rollbacks", "divergence_patience", "spike_action"):
        assert getattr(run, field) == guard[field].default, field
    spectron = SpectronHyperparameters(lr=DEFAULT_LEARNING_RATES["spectron"])
    assert OptimizerArguments().spectron_options() == {
        name: getattr(spectron, name) for name in ("momentum", "ns_steps", "power_iters", "rebalance_every")
    }
    assert inspect.signature(build_optimizer).parameters["adamw_lr"].default is None  # None means DEFAULT_ADAMW_LR
    assert DEFAULT_LEARNING_RATES["adamw"] == DEFAULT_ADAMW_LR
