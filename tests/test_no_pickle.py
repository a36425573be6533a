"""Nothing from disk executes: no module of dptrain/ or scripts/ imports pickle (or a
relative of it), passes allow_pickle=True, or calls eval/exec. Checked on the syntax tree,
so comments and strings that mention these names do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                  "joblib"}
UNSAFE_CALLS = {"eval", "exec", "read_pickle"}


def findings(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe import, allow_pickle=True and eval/exec call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else ""
            if called in UNSAFE_CALLS:
                found.append(f"{where}: {called}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}: allow_pickle={ast.unparse(kw.value)}")
        elif isinstance(node, ast.Name) and node.id == "__import__":
            found.append(f"{where}: __import__")
    return found


def sources() -> list[Path]:
    return sorted(p for d in ("dptrain", "scripts") for p in (ROOT / d).rglob("*.py"))


def test_no_module_can_execute_what_it_loads() -> None:
    files = sources()
    assert len(files) > 20 and ROOT / "dptrain" / "checkpoint.py" in files
    bad = [f for p in files for f in findings(p.read_text(), str(p.relative_to(ROOT)))]
    assert bad == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "import numpy, cloudpickle as cp", "from pickle import loads",
    "from _pickle import Unpickler", "import dill.settings", "np.load(p, allow_pickle=True)",
    "np.load(p, allow_pickle=flag)", "x = eval(text)", "builtins.eval(s)", "exec(code)",
    "pd.read_pickle(p)", "m = __import__('os')"])
def test_the_scan_sees_each_unsafe_form(snippet: str) -> None:
    assert len(findings(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    "np.load(p, allow_pickle=False)", "np.load(p)", "# import pickle",
    "s = 'no eval( here'", "model.eval_batch_size = 3", "evaluate(x)"])
def test_the_scan_ignores_safe_forms(snippet: str) -> None:
    assert findings(snippet) == []
