"""The package's imports run one way, counting imports inside functions:
cli → demo → verbs → edits → formats → checkpoint / writer / adapter / policy → … → errors.

Each module has a layer; a module may import only modules of lower layers. That rules out
cycles and upward imports by itself, so the structure holds without anyone watching it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "loratool"

LAYERS: dict[str, float] = {
    "loratool": 0, "errors": 0,
    "units": 1, "progress": 1, "interrupts": 1, "validate": 1, "ops": 1, "options": 1,
    "paths": 1.2,  # inputs stay inside the folder the user named
    "experts": 1.5,  # mixture-of-experts layouts: names and shapes only
    "tensorfile": 2, "staging": 2, "directio": 2.2, "ggufio": 2.5,
    "sources": 3,
    "checkpoint": 4,
    "lyco": 4.5,  # LyCORIS LoHa / LoKr / full modules: their tensors and ΔW
    "writer": 5, "adapter": 5, "policy": 5,
    "formats.base": 5.5, "formats.peft_params": 5.8, "formats.peft": 6, "formats.kohya": 6, "formats.gguf_names": 5.9, "formats.sgm_names": 5.8, "formats.flux_names": 5.8,
    "formats.gguf": 6,
    "formats.diffusers": 6.5,  # diffusers files are PEFT keys per component
    "formats": 7,
    "edits": 8, "deltas": 8, "merge_gguf": 8.7, "verify": 8.5,
    # the verbs: one command each, and the reports people read
    "merge_pipeline": 9.3,
    "extract": 9, "merge": 9, "combine": 9, "convert": 9, "export": 9, "export_cache": 8.5, "export_stream": 8.6, "export_check": 8.65, "export_adapters": 8.7,
    "hub": 9, "summary": 9, "render": 9, "analyze": 9, "plots": 8.5, "render_analyze": 9.5,
    "demo": 10,  # a tour that runs the verbs
    "clikit": 10.5, "cli": 11, "__main__": 12,
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "loratool"


def _imports(path: Path) -> set[str]:
    """loratool modules that ``path`` imports, anywhere in it."""
    me = _module(path).split(".") if _module(path) != "loratool" else []
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
                found.add(name if name in LAYERS else ".".join(target) or "loratool")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("loratool"):
                    found.add(".".join(alias.name.split(".")[1:]) or "loratool")
    return found


def test_every_module_has_a_layer():
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(LAYERS), modules ^ set(LAYERS)


def test_imports_only_go_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        for target in sorted(_imports(path)):
            if target == me:
                continue
            if LAYERS.get(target, 99) >= LAYERS[me]:
                wrong.append(f"{me} (layer {LAYERS[me]}) imports {target} "
                             f"(layer {LAYERS.get(target)})")
    assert not wrong, "\n".join(wrong)


def test_ops_imports_only_torch():
    tree = ast.parse((PACKAGE / "ops.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert names <= {"torch", "math", "__future__", "heapq"}, names


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
