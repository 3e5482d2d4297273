"""The package's imports: no cycle, and no module importing one above it in the layering of README's Layout section
(every import counts, those inside functions too: they are the optional-dependency seams, not exceptions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "vitexport"


def _layers() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    line = text[text.index("<!-- layers -->") :].splitlines()[1]
    return [[f"vitexport.{m.strip()}" for m in layer.split(",")] for layer in line.split("<")]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    p = ROOT / name.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """module -> the vitexport modules it imports (``from x import y`` counts as x.y when y is a module)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(x for x in (base, node.module or "") if x)
                if target.split(".")[0] == "vitexport":
                    deps |= {f"{target}.{a.name}" if _exists(f"{target}.{a.name}") else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "vitexport"}
        graph[mod] = deps - {mod}
    return graph


def _layer_of(mod: str, layers: list[list[str]]) -> int | None:
    best = None
    for i, layer in enumerate(layers):
        for prefix in layer:
            if mod == prefix or mod.startswith(prefix + "."):
                best = i
    return best


def test_every_module_has_a_layer():
    layers = _layers()
    missing = [m for m in imports() if m != "vitexport" and _layer_of(m, layers) is None]
    assert not missing, f"modules not in README's layer line: {missing}"


def test_no_module_imports_one_above_it():
    layers = _layers()
    bad = []
    for mod, deps in imports().items():
        mine = 0 if mod == "vitexport" else _layer_of(mod, layers)
        for d in deps:
            theirs = 0 if d == "vitexport" else _layer_of(d, layers)
            if theirs is not None and theirs > mine:
                bad.append(f"{mod} (layer {mine}) imports {d} (layer {theirs})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_function_level_imports():
    graph = imports()
    assert "vitexport.quantization.int8" in graph["vitexport.backends.onnxruntime"]  # imported inside build()
    assert "vitexport.profiles" in graph["vitexport.api"]


MAX_FUNCTION_LINES = 60


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested ones too) in vitexport/ longer than ``limit`` lines, def line to last line."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_function_over_60_lines():
    long = long_functions()
    assert not long, f"split these into named steps (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(long)


def test_the_length_check_sees_long_functions(tmp_path):
    # the walk counts the def line to the last line, nested functions included
    src = "def outer():\n    def inner():\n" + "        x = 1\n" * 70 + "    return inner\n"
    nodes = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    assert {n.name: n.end_lineno - n.lineno + 1 for n in nodes} == {"outer": 73, "inner": 71}
    assert any("quantize_int8" in f for f in long_functions(limit=20))
