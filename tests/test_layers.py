"""The package's layers, read from the tree: each subpackage is a layer, and imports run one
way, down (or within a layer, without cycles), counting imports inside functions. What
docs/architecture.md describes, kept true.

    foundation  about, errors, interrupts, progress, units
    reports     what commands return and print: typed dataclasses (torch-free)
    headers     what files and names say, and the options: never imports torch
    numerics    tensor math: torch only
    io          tensors in and out of files
    model       the one in-memory adapter model
    formats     each adapter format, read and written
    engine      the merge plan and kernel, extract's deltas, verification
    verbs       one module per command: the API's implementation
    api         ``loratool`` itself: the public names
    cli         the command line over the API
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "loratool"
ARCHITECTURE = Path(__file__).parent.parent / "docs" / "architecture.md"

LAYERS = ["foundation", "reports", "headers", "numerics", "io", "model", "formats", "engine",
          "verbs", "api", "cli"]
TOP_LEVEL = {"about": "foundation", "errors": "foundation", "interrupts": "foundation",
             "progress": "foundation", "units": "foundation", "options": "headers",
             "loratool": "api", "__main__": "cli"}
# imports that stay inside functions, and why: optional heavy dependencies, platform modules,
# and the command line (and the API) loading a verb's module when that verb runs
LAZY_DEPENDENCIES = {"onnx", "onnxruntime", "onnxscript", "transformers", "diffusers",
                     "matplotlib", "peft", "huggingface_hub", "fcntl", "msvcrt", "resource"}
LAZY_LORATOOL = {"loratool", "verbs.inspect"}  # and every cli module: a command's verb
MAX_FUNCTION_IMPORTS = 40
TORCH_FREE = {"foundation", "headers", "reports"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "loratool"


def layer(module: str) -> str:
    """A module's layer: its subpackage, or for a top-level module its table entry."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(loratool module imported, inside a function?) for every import in ``path``."""
    me = _module(path).split(".") if _module(path) != "loratool" else []
    package = me if path.name == "__init__.py" else me[:-1]
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("loratool"):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import ops` imports the module ops
                name = ".".join(target + [alias.name])
                found.append((name if name in modules else ".".join(target) or "loratool",
                              id(node) in inside))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("loratool"):
                    found.append((".".join(alias.name.split(".")[1:]) or "loratool",
                                  id(node) in inside))
    return found


def test_every_module_has_a_layer():
    for p in PACKAGE.rglob("*.py"):
        assert layer(_module(p)) in LAYERS, f"{_module(p)} is in no layer: add it to one"


def test_imports_only_go_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        for target, _ in _imports(path):
            if target == me or target.startswith(me + ".") and path.name == "__init__.py":
                continue
            if LAYERS.index(layer(target)) > LAYERS.index(layer(me)):
                wrong.append(f"{me} ({layer(me)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Module-level imports form no cycle (a layer's modules may import each other)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module(path)] = {t for t, inside in _imports(path) if not inside}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " → ".join(trail + [m])
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t != m and not m.startswith(t + "."):
                visit(t, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_imports_inside_functions_are_few_and_named():
    """Imports stay at module level, but for optional heavy dependencies, platform modules
    and the command line or API loading a verb's module when it runs."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        tree = ast.parse(path.read_text())
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(f):
                if isinstance(n, ast.Import):
                    found += [(me, a.name.split(".")[0]) for a in n.names]
                elif isinstance(n, ast.ImportFrom):
                    found.append((me, "." if n.level else (n.module or "").split(".")[0]))
    wrong = [f"{m}: {t}" for m, t in found if not (
        t in LAZY_DEPENDENCIES or (t in (".", "loratool") and (
            m in LAZY_LORATOOL or m.startswith("cli."))))]
    assert not wrong, "\n".join(wrong)
    assert len(found) < MAX_FUNCTION_IMPORTS, len(found)


def test_the_torch_free_layers_never_import_torch():
    """Imported whole (every module of them), the torch-free layers leave torch unloaded;
    and `loratool inspect` of a model and of each adapter format stays so (tested in
    test_inspect, test_checkpoint)."""
    modules = sorted("loratool." + _module(p) if _module(p) != "loratool" else "loratool"
                     for p in PACKAGE.rglob("*.py") if layer(_module(p)) in TORCH_FREE)
    # and what every command runs before it imports its verb: the checks, the command line
    modules += ["loratool.verbs.prechecks", "loratool.cli.app"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_architecture_describes_every_module():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [_module(p) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.relative_to(PACKAGE).as_posix()}`"
               not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"


def test_files_and_functions_stay_readable():
    """No file over ~450 lines, no function over ~80: each read at once."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 460:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}: {node.name} is {n} lines")
    assert not long, "\n".join(long)
