"""Nothing in src/ unpickles: ``torch.load`` only with ``weights_only=True``, no ``pickle``/``dill``/``joblib``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def python_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    return files


def _is_torch_load(node: ast.Call) -> bool:
    func = node.func
    return isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch"


def test_torch_load_is_weights_only():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _is_torch_load(node):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_no_pickle_imports():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.relative_to(SRC)}:{node.lineno} ({n})" for n in names if n in UNSAFE_MODULES]
    assert not offenders, f"unpickling modules imported: {offenders}"


def test_the_scan_catches_an_offender(tmp_path):
    tree = ast.parse("import torch\nimport pickle\nx = torch.load('f')\ny = torch.load('f', weights_only=True)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_torch_load(n)]
    assert len(calls) == 2
