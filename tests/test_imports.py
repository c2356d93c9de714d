"""The package's imports point one way (README "Layout of the code"), read from the source with ``ast``:
every ``import`` / ``from ... import`` in every module, function-level ones included.

A *unit* is a subpackage or top-level module of ``ucp_plugin`` (``integrations`` counts one unit per
integration). A unit may import itself and the units of lower layers only; units of one layer do not
import each other (the DeepSpeed adapter never imports the megatron one). ``testing`` is the top: no
product module imports it. No process, no framework import: this runs in well under a second.
"""
from __future__ import annotations

import ast
import os

PACKAGE = "ucp_plugin"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Lowest first. ``errors`` and ``comm`` (the one collective wrapper) are base utilities anyone uses;
# ``models`` declare families in the language; ``session`` is the distributed save protocol the
# adapters share.
LAYERS = (("",), ("errors",), ("comm",), ("format",), ("language",), ("models",), ("plan",), ("storage",), ("dsfiles",),
          ("async_save",), ("session",), ("deepspeed", "megatron"),
          ("integrations.megatron_lm", "integrations.megatron_deepspeed", "integrations"),
          ("tools",), ("cli",), ("testing",))
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(module: str, is_package: bool, tree: ast.AST):
    """(line, absolute module name) of every import in ``tree``, ``from X import a`` giving ``X.a``
    (``a`` may be a submodule; for a plain name the unit is the same)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def unit_of(module: str, root: str = ROOT) -> str | None:
    """The unit of an absolute module name, None outside the package."""
    parts = module.split(".")
    if parts[0] != os.path.basename(root):
        return None
    rest = parts[1:]
    if rest[:1] == ["integrations"] and len(rest) > 1 and os.path.isdir(os.path.join(root, *rest[:2])):
        return ".".join(rest[:2])
    if not rest or not (os.path.isdir(os.path.join(root, rest[0]))
                        or os.path.isfile(os.path.join(root, rest[0] + ".py"))):
        return ""  # ucp_plugin itself, or a name (``__version__``) imported from it
    return rest[0]


def import_edges(root: str = ROOT):
    """(importing unit, imported unit, "file:line") for every import between units of ``root``."""
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = module_name(root, path)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            source = unit_of(module, root)
            for line, target in imported_modules(module, name == "__init__.py", tree):
                unit = unit_of(target, root)
                if unit is not None and unit != source:
                    yield source, unit, f"{os.path.relpath(path, os.path.dirname(root))}:{line}"


def layer_violations(root: str = ROOT) -> list[str]:
    bad = []
    for source, unit, where in import_edges(root):
        if source == "" and unit in RANK and unit != "testing":
            continue  # the package root is the public facade (``ucp_plugin.wait``/``poll``, imported lazily)
        if source not in RANK or unit not in RANK:
            bad.append(f"{where}: unit {source or unit!r} has no layer; add it to LAYERS")
        elif RANK[unit] >= RANK[source]:
            bad.append(f"{where}: {source or PACKAGE} imports {unit} (same or higher layer)")
    return bad


def cycles(root: str = ROOT) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for source, unit, _ in import_edges(root):
        graph.setdefault(source, set()).add(unit)
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_follow_the_layers():
    assert layer_violations() == []


def test_no_cycles_between_subpackages():
    assert cycles() == []


def test_product_code_never_imports_testing():
    bad = [f"{where}: {source} imports ucp_plugin.testing" for source, unit, where in import_edges()
           if unit == "testing" and source != "testing"]
    assert bad == []


def test_the_check_catches_a_wrong_import(tmp_path):
    """A copy of the layering with one import going up (format -> deepspeed), one sideways
    (deepspeed -> megatron, a cycle with its way back) and one into testing."""
    root = tmp_path / PACKAGE
    files = {"__init__.py": "", "format/__init__.py": "from ..deepspeed import save\n",
             "deepspeed/__init__.py": "def f():\n    from ucp_plugin.megatron import checkpoint\n",
             "megatron/__init__.py": "from .. import deepspeed\nfrom ..testing import harness\n",
             "testing/__init__.py": "from ..format import Atom\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    bad = layer_violations(str(root))
    assert any("format/__init__.py:1: format imports deepspeed" in b for b in bad), bad
    assert any("deepspeed/__init__.py:2: deepspeed imports megatron" in b for b in bad), bad
    assert any("megatron/__init__.py:2: megatron imports testing" in b for b in bad), bad
    assert ["deepspeed", "megatron", "deepspeed"] in cycles(str(root))
    assert not any(b.startswith(f"{PACKAGE}/testing") for b in bad)  # testing may import the product
