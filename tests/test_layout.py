"""The package's layers: the library (``ibnorm`` without ``ibnorm.lab``) needs torch alone
and never imports the lab; inside each, imports only flow down the order of
:data:`LAYER_ORDER` (compression → ops → functional → modules → convert → integrations, …);
no ibnorm module takes part in an import cycle.

The import graph is read from the sources with ``ast`` (imports inside functions included,
relative imports resolved), so an import hidden in a function body counts like any other.
The graph helpers are themselves checked on small synthetic packages, so these tests can fail.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

import ibnorm

PACKAGE_DIR = Path(ibnorm.__file__).resolve().parent
LAB = "ibnorm.lab"
# What the lab may use and the library may not, anywhere (also inside functions).
LAB_DEPENDENCIES = ("numpy", "tqdm", "matplotlib", "scipy", "sklearn", "mnist1d", "rdata")
# Third-party packages a library module may import when it is loaded: torch everywhere;
# triton only in the Triton kernels, which are loaded on CUDA when triton imports.
IMPORT_TIME_PACKAGES = {"torch": "ibnorm", "triton": "ibnorm.ops.triton"}


# The architecture, lowest first: a module may import modules of its own unit (the longest
# prefix listed here) or of units in earlier rows, never of a unit in its own row or a later one.
LAYER_ORDER = (
    ("ibnorm._validation", "ibnorm._running_stats"),
    ("ibnorm.compression",),
    ("ibnorm.defaults",),
    ("ibnorm.ops",),
    ("ibnorm.functional",),
    ("ibnorm._norm_parts",),
    ("ibnorm.modules",),
    ("ibnorm.timm_counterparts",),
    ("ibnorm.norms",),
    ("ibnorm.convert",),
    ("ibnorm.integrations", "ibnorm.baselines", "ibnorm.analysis"),
    ("ibnorm",),
    ("ibnorm.lab._io", "ibnorm.lab._measure", "ibnorm.lab._plotting"),
    ("ibnorm.lab.analysis_plots",),
    ("ibnorm.lab.experiments", "ibnorm.lab.benchmark"),
    ("ibnorm.lab.analysis_run",),
    ("ibnorm.lab.cli", "ibnorm.lab"),
)


def unit_of(module: str, order: tuple[tuple[str, ...], ...]) -> str:
    """The longest unit of ``order`` that is ``module`` or contains it."""
    return max((u for row in order for u in row if module == u or module.startswith(u + ".")), key=len, default="")


def layer_violations(graph: dict[str, set[str]], order: tuple[tuple[str, ...], ...]) -> list[tuple[str, str]]:
    """The edges of ``graph`` that do not flow down ``order``: ``(importer, imported)``."""
    rank = {unit: i for i, row in enumerate(order) for unit in row}
    return sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if unit_of(a, order) != unit_of(b, order) and rank[unit_of(b, order)] >= rank[unit_of(a, order)]
    )


# =============================================================================== graph helpers
def module_sources(package_dir: Path, package: str) -> dict[str, tuple[str, bool]]:
    """``{dotted module name: (source, is_package)}`` for every ``.py`` file under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join([package, *parts])] = (path.read_text(encoding="utf-8"), is_package)
    return out


def imported_names(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module ``source`` imports, anywhere in it, as absolute dotted names. ``from X
    import y`` names ``X.y`` when that is a module in ``known``, else ``X``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in known else base)
    return names


def import_graph(sources: dict[str, tuple[str, bool]], prefix: str) -> dict[str, set[str]]:
    """Edges between the modules of ``sources`` (only those whose names start with ``prefix``)."""
    known = set(sources)
    return {
        module: {name for name in imported_names(source, module, is_package, known) if name in known and name.startswith(prefix)}
        for module, (source, is_package) in sources.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle ``[a, b, …, a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


SOURCES = module_sources(PACKAGE_DIR, "ibnorm")
LIBRARY = sorted(m for m in SOURCES if not (m == LAB or m.startswith(LAB + ".")))
LAB_MODULES = sorted(m for m in SOURCES if m == LAB or m.startswith(LAB + "."))


def _synthetic(files: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Sources of a made-up package: names ending in ``/`` are packages."""
    return {name.rstrip("/"): (text, name.endswith("/")) for name, text in files.items()}


def test_the_graph_helpers_find_a_cycle_hidden_in_a_function_and_resolve_relative_imports():
    files = {
        "pkg/": "",
        "pkg.a": "from . import b\n",
        "pkg.b": "def f():\n    from .sub.c import x\n    return x\n",
        "pkg.sub/": "from . import c\n",
        "pkg.sub.c": "def g():\n    from ..a import y\n",
    }
    graph = import_graph(_synthetic(files), "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    files["pkg.sub.c"] = "import os\nfrom pkg import sub\n"  # now c → pkg.sub → c: still a cycle
    assert find_cycle(import_graph(_synthetic(files), "pkg")) == ["pkg.sub.c", "pkg.sub", "pkg.sub.c"]
    files["pkg.sub.c"] = "import os\n"
    assert find_cycle(import_graph(_synthetic(files), "pkg")) is None
    names = imported_names("import numpy.linalg\ndef f():\n    from tqdm import tqdm\n", "pkg.a", False, set())
    assert names == {"numpy.linalg", "tqdm"}


def test_layer_violations_flag_an_upward_or_sideways_import():
    files = {"pkg/": "", "pkg.low": "", "pkg.mid/": "", "pkg.mid.x": "from ..low import y\n", "pkg.side": "", "pkg.top": ""}
    order = (("pkg.low",), ("pkg.mid", "pkg.side"), ("pkg.top", "pkg"))
    assert layer_violations(import_graph(_synthetic(files), "pkg"), order) == []
    files["pkg.low"] = "def f():\n    from .mid import x\n"
    files["pkg.side"] = "from .mid import x\n"
    assert layer_violations(import_graph(_synthetic(files), "pkg"), order) == [("pkg.low", "pkg.mid.x"), ("pkg.side", "pkg.mid.x")]


def test_every_module_belongs_to_a_layer_and_imports_only_flow_down():
    # the root unit holds the package's __init__ alone: a new module needs a row of its own
    assert [m for m in SOURCES if unit_of(m, LAYER_ORDER) == "ibnorm" and m != "ibnorm"] == []
    graph = import_graph(SOURCES, "ibnorm")
    assert layer_violations(graph, LAYER_ORDER) == []


def test_the_package_has_both_layers():
    assert "ibnorm.lab.cli" in LAB_MODULES and "ibnorm.lab.experiments.compare" in LAB_MODULES
    assert {"ibnorm", "ibnorm.analysis.stats", "ibnorm.convert", "ibnorm.ops.dispatch"} <= set(LIBRARY)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_module_imports(module):
    if module.startswith("ibnorm.ops.triton") and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    importlib.import_module(module)


def test_no_import_cycle_among_ibnorm_modules():
    assert find_cycle(import_graph(SOURCES, "ibnorm")) is None


@pytest.mark.parametrize("module", LIBRARY)
def test_library_module_imports_neither_the_lab_nor_its_dependencies(module):
    source, is_package = SOURCES[module]
    names = imported_names(source, module, is_package, set(SOURCES))
    assert not [n for n in names if n == LAB or n.startswith(LAB + ".")], names
    assert not [n for n in names if n.split(".")[0] in LAB_DEPENDENCIES], names
    # at import time (module level): the standard library, ibnorm and torch (triton in the kernels)
    top = imported_names(
        "\n".join(ast.get_source_segment(source, node) for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))),
        module,
        is_package,
        set(SOURCES),
    )
    third_party = {n.split(".")[0] for n in top} - set(sys.stdlib_module_names) - {"ibnorm", "__future__"}
    assert all(module.startswith(IMPORT_TIME_PACKAGES.get(p, "\0")) for p in third_party), third_party


BLOCKED_IMPORT = """
import importlib, json, sys

BLOCKED = {blocked}

class Blocker:  # as if these packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)

sys.meta_path.insert(0, Blocker())
import torch
import ibnorm
for module in {modules}:
    importlib.import_module(module)
from ibnorm.analysis import activation_stats, binned_mutual_information, kernel_mutual_information, paired_comparison
from ibnorm.compression import gaussian_second_moment

x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
y = torch.arange(64) % 2
activation_stats(x), binned_mutual_information(x, y), kernel_mutual_information(x, y)
paired_comparison([1.0, 2.0, 3.5], [0.5, 1.0, 2.0]), gaussian_second_moment("S", 1.0)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith({lab!r}))))
"""


@pytest.mark.slow
def test_importing_the_library_loads_neither_the_lab_nor_its_dependencies():
    """In a fresh interpreter where numpy, tqdm, matplotlib, scipy and scikit-learn cannot be
    imported, ``ibnorm`` and every library module import and the estimators run, and nothing
    of the lab is loaded."""
    modules = [m for m in LIBRARY if not m.startswith("ibnorm.ops.triton") or importlib.util.find_spec("triton")]
    script = BLOCKED_IMPORT.format(blocked=set(LAB_DEPENDENCIES), modules=modules, lab=LAB)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
