"""The package's layering (docs/ARCHITECTURE.md): each layer imports only from itself and the layers below it, no
module imports form a cycle, and modules and functions stay a readable size. Read from the source with `ast`, so
function-local imports count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanochat_jax"

# bottom to top; the package's own __init__ and the entry-point shims (convert.py) sit above everything
LAYERS = ["core", "model", "optim", "data", "train", "interop", "infer", "serve", "tasks", "evaluation", "report",
          "stages", "cli"]
TOP = len(LAYERS)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return TOP
    return LAYERS.index(parts[1])


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nanochat_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanochat_jax"):
            # `from nanochat_jax.pkg import mod` imports nanochat_jax.pkg.mod when that is a module
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                known = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                out.add(sub if known else node.module)
    return out


def test_every_module_sits_in_a_known_layer():
    stray = [m for m, _ in _modules() if m.count(".") >= 1 and m.split(".")[1] not in LAYERS
             and m not in ("nanochat_jax.convert",)]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}; add the folder to LAYERS and the docs"


def test_imports_only_go_down_the_layers():
    upward = []
    for module, path in _modules():
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_module_imports_form_no_cycle():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i != m} for m, p in _modules()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n in graph and not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_modules_and_functions_stay_readable_sizes():
    too_long = []
    for module, path in _modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {n} lines")
    assert not too_long, "over the size limits:\n" + "\n".join(too_long)


def test_the_layering_test_sees_an_upward_import(tmp_path):
    """The checks above read real import statements: an upward one written into a module is found."""
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from nanochat_jax.serve import create_app\n", encoding="utf-8")
    assert _layer(next(iter(_imports(bad)))) == LAYERS.index("serve") > _layer("nanochat_jax.core.config")
