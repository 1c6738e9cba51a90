"""Package housekeeping: import layering, no import cycles, ``python -OO`` imports, a model that knows no method."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gapclip"
FAMILIES = {"gapclip.losses.lgmgc", "gapclip.losses.dias", "gapclip.losses.cusa"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the gapclip modules its import statements name (module level and inside functions alike)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break  # `from pkg import module` names the module; `from module import x` the module itself
        graph[name] = targets
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in graph[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_layering_losses_and_data_never_import_the_model_and_the_model_no_method():
    graph = import_graph()
    lower = [name for name in graph if name.startswith(("gapclip.losses", "gapclip.data"))]
    assert len(lower) > 10
    for name in lower:
        assert "gapclip.modeling" not in reachable(graph, name), name
    from_model = reachable(graph, "gapclip.modeling") | graph["gapclip.modeling"]
    assert not from_model & FAMILIES and "gapclip.losses" not in from_model, sorted(from_model)
    assert "gapclip.testing" not in reachable(graph, "gapclip.teachers")  # the teachers' default is not a test helper


METHOD_WORDS = ("translation", "teacher", "lsc", "gst", "csa", "usa", "dias", "lgmgc", "cusa")


def code_words(path: Path) -> set[str]:
    """Identifiers and string constants of a module's code (docstrings and comments left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_the_model_and_the_collator_know_no_method_by_name():
    # The model, docstrings included (the issue's `grep -n "translation\|teacher" src/gapclip/modeling.py`).
    text = (PACKAGE / "modeling.py").read_text(encoding="utf-8").lower()
    assert "translation" not in text and "teacher" not in text
    for module in ("modeling.py", "data/collator.py", "data/pairs.py", "trainer.py"):
        found = {word for word in code_words(PACKAGE / module) for method in METHOD_WORDS if method in word.lower()}
        assert not found, (module, sorted(found))


def test_no_test_helpers_in_the_package():
    assert not (PACKAGE / "testing_multiprocess.py").exists()


def test_imports_under_python_OO():
    """``-OO`` strips docstrings: nothing may be built from them at import time (the terms' option help, read from
    their docstrings, is then empty). The recipes' modules are not checked: transformers' own ``auto_docstring``
    models (reached through peft) do not import under ``-OO``."""
    code = (
        "import gapclip, gapclip.losses.dias; assert gapclip.GapTerm.__doc__ is None; "
        "print(list(gapclip.TERM_REGISTRY))"
    )
    result = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'dias_inter'" in result.stdout and "'lsc'" in result.stdout
