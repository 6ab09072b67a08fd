"""The model and the optimizer import and run with torch + transformers alone (the lent GPU machines have neither
`datasets` nor `evaluate`), `hf-lowrank --help` works, and the package's import graph has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lowrank.cli import COMMANDS

WITHOUT_DATA_LIBS = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "evaluate"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
import torch, hf_lowrank
model = hf_lowrank.LowRankLlamaForCausalLM(hf_lowrank.preset_config("tiny", lowrank_init="normal"))
optimizer = hf_lowrank.build_optimizer(model, "spectron", lr=0.02)
ids = torch.randint(0, 512, (2, 8))
model(ids, labels=ids).loss.backward()
optimizer.step()
assert "datasets" not in sys.modules and "evaluate" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_model_and_optimizer_need_no_datasets_or_evaluate():
    result = subprocess.run([sys.executable, "-c", WITHOUT_DATA_LIBS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_cli_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "nope"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.startswith("hf-lowrank: error: unknown command 'nope'")


# ------------------------------------------------------------------------------------------------ import graph

PACKAGE = Path(__file__).resolve().parents[1] / "hf_lowrank"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the hf_lowrank modules it imports}``, from every ``import`` statement of the package: at the top of
    a module or inside a function, relative or absolute. ``from package import name`` is an edge to the submodule
    ``package.name`` when that is a module, else to the package itself. A submodule's parents (``__init__``) are
    not counted as imported: Python runs them first, but they are not the module's choice."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module
                imports = [(module, [alias.name for alias in node.names])]
            else:
                continue
            for module, names in imports:
                if module.split(".")[0] != PACKAGE.name:
                    continue
                submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in files}
                edges |= submodules
                if not names or len(submodules) < len(names):
                    edges.add(module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_cycle_finder_sees_imports_inside_functions():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "hf_lowrank.optim.functional" in graph["hf_lowrank.optim.batched"]
    assert "hf_lowrank.optim" in graph["hf_lowrank.training.trainer"]  # `from ..optim import build_optimizer`


def test_package_import_graph_is_acyclic():
    """No module of hf_lowrank imports, at the top or inside a function, a module that imports it back: a
    function-level import that dodges a cycle hides a design knot (cut it by moving the shared piece down)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_optimizer_layers_import_only_downward():
    """functional/hyperparameters <- batched, sharded <- spectron <- routing (docs/optimizer.md)."""
    graph = import_graph()
    optim = {name: {t for t in targets if t.startswith("hf_lowrank.optim.")} for name, targets in graph.items()}
    prefix = "hf_lowrank.optim."
    assert optim[prefix + "functional"] == set() and optim[prefix + "hyperparameters"] == set()
    assert optim[prefix + "batched"] == {prefix + "functional"}
    assert optim[prefix + "sharded"] <= {prefix + "functional", prefix + "batched"}
    assert prefix + "routing" not in optim[prefix + "spectron"]
    assert not any(target.startswith("hf_lowrank.bench") for target in graph[prefix + "sharded"])
