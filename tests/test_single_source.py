"""Each name and rule of the geometry is declared once and imported everywhere else (issue 13, item 2): the projection
and factor names, the long-dimension rule and the parameter counts beside the config, the atomic writers and the
tokenizer file names in `hf_lowrank.files`, the built-in dataset's name in `training.data`. These tests read the
package's source so that a second copy cannot creep back in."""

import ast
import re
from pathlib import Path

import pytest
import torch

from hf_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaForCausalLM, count_parameters, preset_config
from hf_lowrank.configuration_lowrank import (
    ATTENTION_PROJECTIONS,
    LOWRANK_FACTOR_NAMES,
    MLP_PROJECTIONS,
    factor_weight_name,
    long_dim,
)
from hf_lowrank.optim import lowrank_pairs, routing_table
from hf_lowrank.optim.functional import is_wide

PACKAGE = Path(__file__).resolve().parents[1] / "hf_lowrank"
CONFIGURATION = "configuration_lowrank.py"


def _sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def _string_constants(source: str) -> list[str]:
    """Every string literal of ``source``, the literal pieces of f-strings included."""
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def _assignments(source: str) -> set[str]:
    """Names bound at the top level of a module."""
    names = set()
    for node in ast.parse(source).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _defined_in(name: str) -> list[str]:
    return [module for module, source in _sources().items() if name in _assignments(source)]


# ------------------------------------------------------------------------------------------------ declared once
@pytest.mark.parametrize(
    "name, module",
    [
        ("LOWRANK_PROJECTIONS", CONFIGURATION),
        ("ATTENTION_PROJECTIONS", CONFIGURATION),
        ("MLP_PROJECTIONS", CONFIGURATION),
        ("LOWRANK_FACTOR_NAMES", CONFIGURATION),
        ("long_dim", CONFIGURATION),
        ("ParameterCount", CONFIGURATION),
        ("count_parameters", CONFIGURATION),
        ("TOKENIZER_FILES", "files.py"),
        ("STAGING_PREFIX", "files.py"),
        ("write_text_atomic", "files.py"),
        ("write_json_atomic", "files.py"),
        ("fsync_dir", "files.py"),
        ("TRAINING_SUMMARY_NAME", "files.py"),
        ("EVAL_RESULTS_NAME", "files.py"),
        ("BUILTIN_DATASET", "training/data.py"),
        ("LOCAL_FILES_DATASET", "training/data.py"),
    ],
)
def test_declared_in_one_module(name, module):
    assert _defined_in(name) == [module]


def test_no_other_module_spells_a_factor_parameter_name():
    """`"….up.weight"`, `"q_proj.down"` or a bare `"up"` are derived from `LOWRANK_FACTOR_NAMES`
    (`factor_weight_name`, `UP_FACTOR`, `DOWN_FACTOR`), never written out."""
    factor = "|".join(LOWRANK_FACTOR_NAMES)
    pattern = re.compile(rf"^(?:[\w.*]*\.)?(?:{factor})(?:\.(?:weight|bias))?$")
    offenders = {
        module: hits
        for module, source in _sources().items()
        if module != CONFIGURATION and (hits := [s for s in _string_constants(source) if pattern.match(s)])
    }
    assert not offenders


def test_no_other_module_lists_the_projections():
    """A tuple or list of projection names outside the configuration is a second copy of `LOWRANK_PROJECTIONS`."""
    projections = set(LOWRANK_PROJECTIONS)
    offenders = []
    for module, source in _sources().items():
        if module == CONFIGURATION:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in projections]
                if len(names) >= 2:
                    offenders.append((module, node.lineno, names))
    assert not offenders


def test_no_other_module_restates_the_long_dimension_rule():
    """Comparing a matrix's two sides is `long_dim`'s job (`is_wide` and the FSDP2 placement derive from it)."""
    rule = re.compile(r"shape\[0\]\s*[<>]=?\s*[\w.]*shape\[1\]|shape\[1\]\s*[<>]=?\s*[\w.]*shape\[0\]")
    offenders = [module for module, source in _sources().items() if module != CONFIGURATION and rule.search(source)]
    assert not offenders


def test_no_other_module_spells_the_dataset_names():
    from hf_lowrank.training.data import BUILTIN_DATASET, LOCAL_FILES_DATASET

    offenders = [
        module
        for module, source in _sources().items()
        if module != "training/data.py" and {BUILTIN_DATASET, LOCAL_FILES_DATASET} & set(_string_constants(source))
    ]
    assert not offenders


def test_no_other_module_spells_a_record_file_name():
    """`training_summary.json` and `eval_results.json` are written by one command and read by others (the card, push):
    a second spelling would let them drift apart."""
    names = {"training_summary.json", "eval_results.json"}
    offenders = [
        module
        for module, source in _sources().items()
        if module != "files.py" and names & set(_string_constants(source))
    ]
    assert not offenders


def test_files_are_written_only_through_the_atomic_writers():
    """A record, report or table a command leaves behind is complete or absent (R1): no module writes a file in
    place. `Path.write_text`/`write_bytes`, `json.dump` to a handle and `open(..., "w")` belong to `files.py` (and
    to the checkpoint writer, which stages a whole folder); `/proc` control files are not records."""
    allowed = {"files.py"}
    offenders = []
    for module, source in _sources().items():
        if module in allowed:
            continue
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("write_text", "write_bytes") or (
                isinstance(func, ast.Attribute) and name == "dump" and getattr(func.value, "id", "") == "json"
            ):
                offenders.append((module, node.lineno, name))
            elif name == "open" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                target = node.args[0]
                if "w" in str(node.args[1].value) and not (
                    isinstance(target, ast.Constant) and str(target.value).startswith("/proc/")
                ):
                    offenders.append((module, node.lineno, "open"))
    assert not offenders


# ------------------------------------------------------------------------------------------------ and agrees
def test_projection_groups_partition_the_projections():
    assert ATTENTION_PROJECTIONS + MLP_PROJECTIONS == LOWRANK_PROJECTIONS
    config = preset_config("tiny")
    assert tuple(config.projection_shapes()) == LOWRANK_PROJECTIONS


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {"lowrank_modules": ["q_proj", "down_proj"], "rank_overrides": {"down_proj": 7}},
        {"lowrank_modules": []},
    ],
)
def test_parameter_counts_match_the_model(overrides):
    config = preset_config("tiny", lowrank_init="normal", **overrides)
    model = LowRankLlamaForCausalLM(config)
    assert count_parameters(config).total == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    for name in LOWRANK_PROJECTIONS:
        parent = layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp
        module = getattr(parent, name)
        assert config.projection_parameters(name) == sum(p.numel() for p in module.parameters()), name


def test_factor_names_are_the_parameter_names():
    model = LowRankLlamaForCausalLM(preset_config("tiny", lowrank_init="normal"))
    parameters = dict(model.named_parameters())
    for module_name, up, down in lowrank_pairs(model):
        names = [factor_weight_name(module_name, factor) for factor in LOWRANK_FACTOR_NAMES]
        assert [parameters[name] for name in names] == [down, up]
    routed = dict(routing_table(model, "spectron"))
    assert all(name in routed for name in parameters)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (1, 7)])
def test_long_dimension_rule(shape):
    dim = long_dim(shape)
    assert shape[dim] == max(shape) and (shape[0] != shape[1] or dim == 0)
    assert is_wide(torch.empty(shape)) == (dim == 1)
