"""The package's layering, read from the source: layers know nothing of MPI, communicators
nothing of layers, and data flows one way (cli -> config -> training -> the parts).

Every ``import`` and ``from ... import`` of every module under dptrain/ counts, also the
ones inside functions (which keep ``--help`` fast but are dependencies all the same).
"""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "dptrain"

#: package or module -> what it must never import (dptrain parts, or outside libraries)
FORBIDDEN = {
    "dptrain.nn": ("dptrain.parallel", "dptrain.training", "dptrain.data", "dptrain.config",
                   "dptrain.checkpoint", "dptrain.cli", "dptrain.backend", "mpi4py", "cupy",
                   "h5py"),
    "dptrain.parallel": ("dptrain.nn", "dptrain.training", "dptrain.data", "dptrain.config",
                         "dptrain.checkpoint", "dptrain.cli", "dptrain.optim", "h5py"),
    "dptrain.data": ("dptrain.nn", "dptrain.training", "dptrain.config", "dptrain.cli",
                     "dptrain.optim", "mpi4py"),
    "dptrain.optim": ("dptrain.nn", "dptrain.parallel", "dptrain.training", "dptrain.data",
                      "dptrain.cli", "mpi4py"),
    "dptrain.checkpoint": ("dptrain.parallel", "dptrain.training", "dptrain.data",
                           "dptrain.cli", "mpi4py"),
    "dptrain.config": ("dptrain.nn", "dptrain.parallel", "dptrain.training", "dptrain.data",
                       "dptrain.checkpoint", "dptrain.cli", "mpi4py"),
}
#: who may import the training package and the command line (dptrain.commands holds the
#: command line's subcommands)
TRAINING_USERS = ("dptrain.training", "dptrain.cli", "dptrain.commands")


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> set[str]:
    """Every module name ``path`` imports, absolute (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_scan_reads_relative_and_function_level_imports():
    assert "dptrain.parallel.split" in MODULES["dptrain.data.sampler"]      # from ..parallel
    assert "dptrain.nn.Sequential" in MODULES["dptrain.checkpoint"]         # inside a function
    assert "mpi4py.MPI" in MODULES["dptrain.parallel.mpi"]
    assert len(MODULES) > 80


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not_know(layer):
    bad = sorted(f"{m} imports {dep}" for m, deps in MODULES.items() if within(m, layer)
                 for dep in deps for no in FORBIDDEN[layer] if within(dep, no))
    assert bad == []


def test_only_the_command_line_and_training_import_training():
    bad = sorted(f"{m} imports {dep}" for m, deps in MODULES.items()
                 if not any(within(m, u) for u in TRAINING_USERS) and m != "dptrain.__main__"
                 for dep in deps if within(dep, "dptrain.training") or within(dep, "dptrain.cli"))
    assert bad == []
