"""The package's shape (docs/architecture.md): an acyclic import graph, no hidden project imports inside
functions, the command wing at the top and alone with argparse, wings that point down only, no function longer
than a screen and no module longer than MAX_MODULE_LINES."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unet"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
COMMAND_WING = "unet.cli"
# Functions in files outside this refactor's reach, each with its reason; the test fails once one shrinks.
TOO_LONG_ALLOWED: dict[tuple[str, str], str] = {}  # (file, function) -> why; none today


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """Project modules an import statement names (``from unet import x`` names unet.x when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return subs if len(subs) == len(node.names) else subs + [node.module]
    return []


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Import edges between project modules, and any project import made inside a function."""
    modules = _modules()
    edges, nested = {m: set() for m in modules}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            nested += [f"{name}.{fn.name} imports {m}" for n in ast.walk(fn) for m in _imported(n, modules)]
        for node in ast.walk(tree):
            edges[name] |= {m for m in _imported(node, modules) if m != name}
    return edges, nested


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_import_graph_is_acyclic_and_has_no_function_level_project_imports():
    edges, nested = _graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))
    assert nested == []


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# (low, high): low must never reach high, directly or through others.
LAYERS = [
    # the command wing's shared module knows no job
    ("unet.cli.common", "unet.training.trainer"), ("unet.cli.common", "unet.evaluation.checkpoints"),
    ("unet.cli.common", "unet.prediction.stacks"), ("unet.cli.common", "unet.export.bioimageio"),
    # prediction knows no job; evaluation and inference never import each other; training may use evaluation
    ("unet.prediction.predictor", "unet.evaluation.slices"), ("unet.prediction.predictor", "unet.prediction.stacks"),
    ("unet.prediction.tiling", "unet.prediction.tiles"), ("unet.prediction.tiles", "unet.prediction.pipeline"),
    ("unet.prediction.stacks", "unet.evaluation.slices"), ("unet.evaluation.slices", "unet.training.trainer"),
    ("unet.evaluation.checkpoints", "unet.training.trainer"), ("unet.evaluation.tables", "unet.evaluation.slices"),
    # the training wing: the loop uses its units, never the other way round
    ("unet.training.config", "unet.training.trainer"), ("unet.training.resume", "unet.training.trainer"),
    ("unet.training.narration", "unet.training.trainer"), ("unet.training.benchmark", "unet.training.trainer"),
    ("unet.export.bioimageio", "unet.prediction.stacks"), ("unet.export.bioimageio", "unet.prediction.jobs"),
    # the metrics wing is below prediction, training and losses
    ("unet.metrics.segmentation", "unet.prediction.predictor"), ("unet.metrics.segmentation", "unet.losses"),
    ("unet.metrics.isbi", "unet.prediction.predictor"), ("unet.metrics.instances", "unet.prediction.instances"),
    # the I/O room is below everything that reads or writes data, and knows no rank
    ("unet.io.images", "unet.data.datasets"), ("unet.io.images", "unet.prediction.predictor"),
    ("unet.io.images", "unet.distributed"), ("unet.io.writers", "unet.prediction.instances"),
    ("unet.io.volumes", "unet.data.datasets"), ("unet.io.volumes", "unet.distributed"),
    ("unet.io.volume_writers", "unet.prediction.predictor"),
    ("unet.data.synthetic", "unet.data.datasets"), ("unet.data.synthetic", "unet.io.images"),
    ("unet.options", "unet.errors"),
]


@pytest.mark.parametrize("low, high", LAYERS)
def test_layers_point_down_only(low, high):
    edges, _ = _graph()
    assert low in edges and high in edges, f"{low} or {high} is no module: update LAYERS"

    def reaches(a: str, b: str, seen=None) -> bool:
        seen = seen if seen is not None else set()
        return a == b or any(reaches(n, b, seen) for n in edges[a] - seen if not seen.add(n))

    assert not reaches(low, high), f"{low} must not import {high} (directly or through others)"


def test_nothing_outside_the_command_wing_imports_it():
    edges, _ = _graph()
    outside = {m: sorted(n for n in out if n.startswith(COMMAND_WING)) for m, out in edges.items()
               if not m.startswith(COMMAND_WING)}
    assert {m: out for m, out in outside.items() if out} == {}


def _library_trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _module_name(path).startswith(COMMAND_WING):
            yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_no_module_outside_the_command_wing_imports_argparse():
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in _library_trees() for node in ast.walk(tree)
             if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
             or isinstance(node, ast.ImportFrom) and node.module == "argparse"]
    assert found == []


def test_no_namespace_is_built_or_typed_in_library_code():
    # argparse.Namespace, or a home-made stand-in (types.SimpleNamespace), built or named outside the wing.
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in _library_trees() for node in ast.walk(tree)
             if isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) or node.attr) in
             ("Namespace", "SimpleNamespace")]
    assert found == []


def test_no_module_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_longer_than_a_screen():
    too_long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long[(rel, node.name)] = lines
    assert set(too_long) == set(TOO_LONG_ALLOWED), too_long
