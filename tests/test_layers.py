"""The package's import graph points one way (no cycle, imports inside functions included), and
llama-cpp-python's private attributes are touched in one module."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "minicache_gguf"

# a module may import only modules of a lower rank (this also rules out every cycle)
RANK = {
    "_version": 0, "_engine": 0, "reference": 0, "kvstate": 0, "report": 0,
    "config": 1, "native": 1, "corpus": 1,
    "model": 2, "layout": 2, "engine": 2,
    "alignment": 3, "calfile": 3,
    "_internals": 4,
    "metrics": 5, "validate": 5,
    "calibrate": 6,
    "llama": 7,
    "analyze": 8, "bench": 8, "evaluate": 8, "generate": 8,
    "chat": 9, "server": 9, "llama_server": 9,
    "cli": 10,
    "__init__": 11,
}


def _imports(path: Path) -> set:
    """Package modules a file imports, anywhere in it (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minicache_gguf"):
            rest = node.module.split(".")[1:]
            out.update(rest[:1] or [a.name for a in node.names])
    return out


def test_every_module_has_a_layer():
    assert {p.stem for p in PKG.glob("*.py")} == set(RANK)


def test_imports_point_one_way():
    bad = []
    for p in PKG.glob("*.py"):
        for dep in _imports(p):
            if dep in RANK and RANK[dep] >= RANK[p.stem]:
                bad.append(f"{p.stem} (layer {RANK[p.stem]}) imports {dep} (layer {RANK[dep]})")
    assert not bad, bad


def test_llama_cpp_python_internals_touched_in_one_module():
    private = re.compile(r"\.(_ctx|_batch|_model|_stack|_input_ids)\b")
    users = {p.stem for p in PKG.glob("*.py") if private.search(p.read_text())}
    assert users <= {"_internals", "llama"}, users
    assert "_internals" in users


def test_engine_mirror_is_only_a_mirror():
    assert _imports(PKG / "engine.py") == {"_engine"}


def test_one_version():
    from minicache_gguf import __version__

    declared = re.search(r'^version = "([^"]+)"', (PKG.parent / "pyproject.toml").read_text(), re.M).group(1)
    assert declared == __version__
