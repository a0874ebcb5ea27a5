"""The import graph: the library stands alone, and the recipes do not reach into the demo.

Read from the source (every module's AST), so an import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"aki_training", "aki_eval", "aki_demo", "training", "eval", "demo"}


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """{module file: top-level packages it imports}; relative imports stay inside the folder and are left out."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                names.update(arg.value.split(".")[0] for arg in node.args[:1] if isinstance(arg, ast.Constant))
        found[str(path.relative_to(folder.parent))] = names
    return found


def test_the_reader_sees_every_kind_of_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "import os.path\nfrom aki_eval.run import x\nfrom . import sibling\n"
        "def f():\n    import aki_demo\n    return importlib.import_module('aki_training.data')\n"
    )
    assert imported_packages(tmp_path / "pkg") == {"pkg/a.py": {"os", "aki_eval", "aki_demo", "aki_training"}}


def test_the_library_imports_no_recipe():
    modules = imported_packages(ROOT / "aki")
    assert len(modules) >= 10
    offenders = {path: sorted(names & RECIPES) for path, names in modules.items() if names & RECIPES}
    assert offenders == {}


@pytest.mark.parametrize("folder", ["training", "eval"])
def test_training_and_evaluation_name_the_demo_only_in_data(folder):
    """The demo plugs in through import paths in YAML and on the command line, never through code here."""
    modules = imported_packages(ROOT / folder)
    demo = {"aki_demo", "demo"}
    offenders = {path: sorted(names & demo) for path, names in modules.items() if names & demo}
    assert offenders == {}
