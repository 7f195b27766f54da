"""The package's shape: layers import only downward, no cycles, small functions, no repeated blocks.

Read from the sources with ``ast`` (nothing is imported), so a violation is named by file and line.
Layers, bottom to top (a module may import its own layer or lower ones, never a higher one):

core 0 < io 1 < models 2 < embed 3 < segment 4 < pipelines 5 < profiling 6 < evaluate 7 < workflows 8
< cli / doctor / __init__ / __main__ 9. ``train`` stands beside them: it may import core, io, models and
embed, and only the CLI imports it.
"""
from __future__ import annotations

import ast
import hashlib
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "microsnoop"

LAYERS = {"core": 0, "io": 1, "models": 2, "embed": 3, "segment": 4, "pipelines": 5, "profiling": 6,
          "evaluate": 7, "workflows": 8, "cli": 9, "doctor": 9, "__init__": 9, "__main__": 9}
BESIDE = {"train": ({"core", "io", "models", "embed"}, {"cli"})}  # unit: (may import, imported only by)
MAX_FUNCTION_LINES = 80
DUPLICATE_LINES = 6


# ---------------------------------------------------------------------------------------- checkers

def _module_parts(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of_node(node: ast.Import | ast.ImportFrom, path: Path, root: Path) -> list[tuple[str, int]]:
    """Absolute module names one import statement of ``path`` names (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [(a.name, node.lineno) for a in node.names]
    parts = _module_parts(path, root)
    package = parts if path.name == "__init__.py" else parts[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    mod = ".".join(base + ([node.module] if node.module else []))
    if node.module is None or "." not in mod:  # ``from . import x`` / ``from pkg import x``: x may be a module
        return [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return [(mod, node.lineno)]


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """Absolute module names ``path`` imports, at any depth (inside functions too), with line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out += imports_of_node(node, path, root)
    return out


def unit_of(module: str, package: str) -> str | None:
    """The layer unit of a module of ``package`` (its first sub-name), None for other packages."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges(root: Path, package: str) -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) for every import between two units of ``package``."""
    units = {p.stem for p in (root / package).iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    edges = []
    for path in sorted((root / package).rglob("*.py")):
        src_unit = unit_of(".".join(_module_parts(path, root)) or package, package)
        if path.parent == root / package:
            src_unit = path.stem
        for mod, line in imports_of(path, root):
            dst = unit_of(mod, package)
            if dst is not None and dst not in units:  # ``from microsnoop import name``: the top package
                dst = "__init__"
            if dst is not None and dst != src_unit:
                edges.append((src_unit, dst, str(path.relative_to(root)), line))
    return edges


def layer_violations(edges: list[tuple[str, str, str, int]], layers: dict[str, int],
                     beside: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    """Upward imports, imports of a unit not in the map, and imports breaking a beside-unit's rules."""
    bad = []
    for a, b, f, line in edges:
        where = f"{f}:{line}: {a} imports {b}"
        if a not in layers and a not in beside or b not in layers and b not in beside:
            bad.append(f"{where} (unit not in the layer map)")
        elif a in beside:
            if b not in beside[a][0]:
                bad.append(f"{where} ({a} may import only {sorted(beside[a][0])})")
        elif b in beside:
            if a not in beside[b][1]:
                bad.append(f"{where} (only {sorted(beside[b][1])} may import {b})")
        elif layers[b] > layers[a]:
            bad.append(f"{where} (upward: layer {layers[a]} -> {layers[b]})")
    return bad


def unit_cycles(edges: list[tuple[str, str, str, int]]) -> list[list[str]]:
    """Cycles in the graph of units (each found once, from its smallest unit)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _, _ in edges:
        graph[a].add(b)
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path + [start])
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return out


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-stripped text) of the lines that carry logic: no blanks, comments,
    imports, docstrings or lone closing brackets."""
    text = path.read_text()
    skip = _docstring_lines(ast.parse(text, str(path)))
    out = []
    for i, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if i in skip or not s or s.startswith(("#", "import ", "from ")) or not s.strip(")]},:"):
            continue
        out.append((i, s))
    return out


def repeated_blocks(root: Path, n: int = DUPLICATE_LINES) -> list[str]:
    """Pairs of places sharing ``n`` consecutive code lines (after :func:`code_lines`)."""
    seen: dict[str, tuple[Path, int]] = {}
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = code_lines(path)
        last_hit = -n
        for k in range(len(lines) - n + 1):
            window = "\n".join(s for _, s in lines[k:k + n])
            h = hashlib.sha256(window.encode()).hexdigest()
            if h in seen and seen[h] != (path, k):
                if k - last_hit >= n:  # one report per run of overlapping windows
                    p0, k0 = seen[h]
                    out.append(f"{path.relative_to(root)}:{lines[k][0]} repeats {p0.relative_to(root)} "
                               f"(code line {k0 + 1})")
                last_hit = k
            else:
                seen.setdefault(h, (path, k))
    return out


# ------------------------------------------------------------------------------- the package itself

def test_layers_import_only_downward():
    edges = import_edges(SRC, PACKAGE)
    assert len(edges) > 50  # the scan sees the package's real imports
    assert layer_violations(edges, LAYERS, BESIDE) == []


def test_no_import_cycles_between_subpackages():
    assert unit_cycles(import_edges(SRC, PACKAGE)) == []


def test_every_unit_is_in_the_layer_map():
    units = {p.name if p.is_dir() else p.stem for p in (SRC / PACKAGE).iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert units - set(LAYERS) - set(BESIDE) == set()


def test_no_function_over_80_lines():
    assert long_functions(SRC / PACKAGE) == []


def test_no_block_of_six_lines_repeated():
    assert repeated_blocks(SRC / PACKAGE) == []


def module_imports_closure(module: str, root: Path, package: str) -> set[str]:
    """Modules of ``package`` that importing ``module`` loads (module-level imports, followed
    transitively, with the subpackages' ``__init__``; the top package's own ``__init__`` is left out)."""
    def file_of(mod: str) -> Path | None:
        p = root.joinpath(*mod.split("."))
        return p / "__init__.py" if (p / "__init__.py").exists() else (p.with_suffix(".py") if p.with_suffix(".py").exists() else None)

    todo, seen = [module], set()
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for k in range(2, len(parts) + 1):  # parents run first
            parent = ".".join(parts[:k])
            f = file_of(parent)
            if parent in seen or f is None:
                continue
            seen.add(parent)
            tree = ast.parse(f.read_text())
            fake = Path(root, *parent.split("."), "__init__.py") if f.name == "__init__.py" else f
            for node in tree.body:  # module level only: imports inside functions run on use
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for name, _ in imports_of_node(node, fake, root):
                        if name.split(".")[0] == package:
                            todo.append(name)
    return seen


def test_classical_segmentation_loads_neither_embed_nor_models():
    """The numpy watershed sits below embed: importing it must not load the engine or register models."""
    loaded = module_imports_closure("microsnoop.segment.classical", SRC, PACKAGE)
    assert "microsnoop.io.normalize" in loaded
    assert not [m for m in loaded if m.startswith(("microsnoop.embed", "microsnoop.models"))]


# ------------------------------------------------------------------ the checkers catch what they should

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / "pkg" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_upward_imports_relative_and_inside_functions(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "io/__init__.py": "", "evaluate/__init__.py": "",
                            "io/a.py": "def f():\n    from ..evaluate import b\n",
                            "evaluate/b.py": "from ..io import a\nimport pkg.io.a\n",
                            "train/__init__.py": "", "train/t.py": "from ..evaluate import b\n"})
    bad = layer_violations(import_edges(root, "pkg"), LAYERS, BESIDE)
    assert any("io/a.py:2: io imports evaluate (upward" in b for b in bad)
    assert any("train/t.py:1: train imports evaluate (train may import only" in b for b in bad)
    assert not any("evaluate/b.py" in b for b in bad)  # downward is fine
    assert unit_cycles(import_edges(root, "pkg")) == [["evaluate", "io", "evaluate"]]


def test_checker_counts_a_name_from_the_top_package_as_an_import_of_it(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "from .embed import run\n", "embed/__init__.py": "",
                            "embed/run.py": "from .. import __version__\n"})
    edges = import_edges(root, "pkg")
    assert ("embed", "__init__", "pkg/embed/run.py", 1) in edges
    assert layer_violations(edges, LAYERS, BESIDE) == ["pkg/embed/run.py:1: embed imports __init__ (upward: layer 3 -> 9)"]
    assert unit_cycles(edges) == [["__init__", "embed", "__init__"]]


def test_checker_finds_a_cycle_within_one_layer(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "cli.py": "from . import doctor\n",
                            "doctor.py": "def f():\n    from .cli import app\n"})
    edges = import_edges(root, "pkg")
    assert layer_violations(edges, LAYERS, BESIDE) == []  # same layer: allowed one way...
    assert unit_cycles(edges) == [["cli", "doctor", "cli"]]  # ...but not in a circle


def test_checker_finds_long_functions_and_repeated_blocks(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    short = "".join(f"    z{i} = {i}\n" for i in range(78))
    block = "".join(f"y = compute(y, {i}) + {i * 7}\n" for i in range(6))
    root = _tree(tmp_path, {"long.py": f"def f():\n{body}    return x0\n\n\ndef g():\n{short}    return z0\n",
                            "a.py": '"""Doc."""\nimport os\n\n' + block,
                            "b.py": "def h(y):\n    # why\n    " + block.replace("\n", "\n    ").rstrip() + "\n    return y\n",
                            "c.py": block[:block.rindex("y = ")]})  # five of the six lines: not a repeat
    assert long_functions(root / "pkg") == ["long.py:1 f: 82 lines"]
    reps = repeated_blocks(root / "pkg")
    assert len(reps) == 1 and reps[0].startswith("b.py:3 repeats a.py")


@pytest.mark.parametrize("line", ["", "# note", "import numpy as np", "from . import x"])
def test_code_lines_skip_what_carries_no_logic(tmp_path, line):
    p = tmp_path / "m.py"
    p.write_text(f'def f():\n    """Doc\n    more."""\n    {line}\n    return 1\n')
    assert code_lines(p) == [(1, "def f():"), (5, "return 1")]


def test_code_lines_skip_lone_closing_brackets(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    return g(\n        1,\n    )\n")
    assert code_lines(p) == [(1, "def f():"), (2, "return g("), (3, "1,")]
