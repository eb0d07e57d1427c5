"""The import direction of docs/design.md ("Layers"), checked on every module's source.

``sparge_core`` < ``calibrate`` < ``evals`` < ``scripts``: a module imports only its own layer and the
layers below it (function-level imports included); ``sparge_core`` imports nothing but the standard
library, torch and triton at module level (optional extras are imported inside the function that
needs them); files in ``scripts/`` do not import each other (what they share lives in a package).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("sparge_core", "calibrate", "evals", "scripts")
CORE_MODULE_LEVEL = {"torch", "triton", "sparge_core"}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    module_level: bool  # executed when the importing module is imported
    names: tuple[str, ...] = ()  # ``from module import names``


def _package_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    else:
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".") if package else []
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, package: str) -> list[Import]:
    """Every import in ``source`` (relative ones resolved against ``package``), marking those that run
    at module import time (module body, class bodies, module-level if/try/with, not ``if
    TYPE_CHECKING:``) apart from those inside functions."""
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                level = False
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit_stmt(sub, False)
                for sub in child.orelse:
                    visit_stmt(sub, module_level)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(Import(_resolve(child, package), child.lineno, level,
                                    tuple(a.name for a in child.names)))
            visit(child, level)

    def visit_stmt(stmt: ast.stmt, module_level: bool) -> None:
        wrapper = ast.Module(body=[stmt], type_ignores=[])
        visit(wrapper, module_level)

    visit(ast.parse(source), True)
    return found


def _layer(name: str) -> int | None:
    top = name.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def _files() -> list[Path]:
    out = []
    for top in LAYERS:
        out.extend(sorted((REPO / top).rglob("*.py")))
    return out


def _script_names() -> set[str]:
    return {p.stem for p in (REPO / "scripts").rglob("*.py")}


def _exists(module: str) -> bool:
    """A project module (``calibrate.models``) is a file or a package folder of this checkout."""
    base = REPO.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def missing_project_modules(imp: Import) -> list[str]:
    """The project modules an import names that this checkout does not have (an installed copy of
    another checkout would otherwise answer the import silently)."""
    if _layer(imp.module) is None or imp.module.split(".")[0] == "scripts":
        return []
    if not _exists(imp.module):
        return [imp.module]
    init = REPO.joinpath(*imp.module.split(".")) / "__init__.py"
    if not init.is_file():
        return []
    defined = init.read_text(encoding="utf-8")
    return [f"{imp.module}.{name}" for name in imp.names
            if name != "*" and not _exists(f"{imp.module}.{name}") and name not in defined]


def violations(path: Path, source: str | None = None) -> list[str]:
    """The layering rules ``path`` breaks (its source read from disk unless given)."""
    rel = path.relative_to(REPO)
    own = LAYERS.index(rel.parts[0])
    source = path.read_text(encoding="utf-8") if source is None else source
    package = _package_of(path)
    stdlib = set(sys.stdlib_module_names)
    scripts = _script_names()
    bad = []
    for imp in imports_of(source, package):
        top = imp.module.split(".")[0]
        layer = _layer(imp.module)
        where = f"{rel}:{imp.line} imports {imp.module}"
        for missing in missing_project_modules(imp):
            bad.append(f"{where}: no module {missing} in this checkout (moved? import it from its new place)")
        if layer is not None and layer > own:
            bad.append(f"{where}: {LAYERS[own]} may not import {LAYERS[layer]} (layers go {' < '.join(LAYERS)})")
        if own == 0 and imp.module_level and top not in CORE_MODULE_LEVEL and top not in stdlib:
            bad.append(f"{where} at module level: sparge_core imports only the standard library, torch and "
                       f"triton at import time (import optional packages inside the function that uses them)")
        if own == 3 and layer is None and top in scripts and top not in stdlib:
            bad.append(f"{where}: scripts/ files do not import each other; move what they share into a package")
    return bad


def test_every_module_follows_the_import_direction():
    bad = [v for path in _files() for v in violations(path)]
    assert not bad, "\n".join(bad)


def test_tests_import_only_modules_that_exist():
    bad = [f"{path.relative_to(REPO)}:{imp.line}: no module {missing} in this checkout"
           for path in sorted((REPO / "tests").rglob("*.py"))
           for imp in imports_of(path.read_text(encoding="utf-8"), "tests")
           for missing in missing_project_modules(imp)]
    assert not bad, "\n".join(bad)


def test_no_python_under_results():
    found = sorted(str(p.relative_to(REPO)) for p in (REPO / "results").rglob("*.py"))
    assert not found, f"results/ holds data, not code; move these to scripts/: {found}"


@pytest.mark.parametrize("rel,source,fragment", [
    ("calibrate/x.py", "from evals.runner import write_result\n", "calibrate may not import evals"),
    ("calibrate/x.py", "def f():\n    import evals.models\n", "calibrate may not import evals"),
    ("sparge_core/x.py", "from calibrate import search\n", "sparge_core may not import calibrate"),
    ("sparge_core/x.py", "import numpy as np\n", "sparge_core imports only"),
    ("sparge_core/ops/x.py", "try:\n    import safetensors\nexcept ImportError:\n    pass\n", "sparge_core imports only"),
    ("evals/x.py", "from scripts import demo\n", "evals may not import scripts"),
    ("evals/sub/x.py", "from ...scripts import demo\n", "evals may not import scripts"),
    ("scripts/x.py", "from demo import main\n", "do not import each other"),
    ("scripts/x.py", "from evals.models import load_model\n", "no module evals.models"),
    ("scripts/x.py", "from evals import models\n", "no module evals.models"),
])
def test_the_checker_catches_each_kind_of_violation(rel, source, fragment):
    bad = violations(REPO / rel, source)
    assert any(fragment in v for v in bad), bad


@pytest.mark.parametrize("rel,source", [
    ("sparge_core/x.py", "import math\nimport torch\nfrom .ops import blocks\n"),
    ("sparge_core/x.py", "def f():\n    import transformers\n"),  # an optional extra, imported lazily
    ("sparge_core/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"),
    ("evals/x.py", "from calibrate.models import load_model\nfrom sparge_core import sparge_attn\n"),
    ("scripts/x.py", "from evals.environment import gpu_name\nimport argparse\n"),
])
def test_the_checker_accepts_the_allowed_direction(rel, source):
    assert violations(REPO / rel, source) == []


def test_the_repo_cites_only_its_own_docs():
    """The design lives in docs/design.md; nothing points at files a user of the repo does not have."""
    banned = ("DESIGN.md", "shared/reference", "reference/paper.md", "reference/peers.md")
    roots = [REPO / d for d in (*LAYERS, "tests", "docs", "results", ".ci")]
    files = [p for r in roots for p in r.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".sh", ".yaml", ".txt")]
    files += [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    this = Path(__file__).resolve()
    bad = [f"{p.relative_to(REPO)}: {word}" for p in files if p.resolve() != this
           for word in banned if word in p.read_text(encoding="utf-8", errors="replace")]
    assert not bad, "\n".join(bad)
