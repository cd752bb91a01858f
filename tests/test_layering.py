"""survey_infer never imports training, deploy or catalogs at module level; tasks stay out of the machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import survey_infer

PACKAGE = Path(survey_infer.__file__).parent
DOWNSTREAM = ("training", "deploy", "catalogs")
# The only modules allowed to reach downstream packages, and only through imports inside functions.
LAZY_ALLOWED = {"cli.py", "demo.py"}
TASK_AGNOSTIC = ("pipeline.py", "worker.py", "store.py", "outputs.py", "bundle.py", "engines")


def imported_modules(tree: ast.AST, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_runtime_does_not_import_downstream_packages():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level_only = path.name in LAZY_ALLOWED and path.parent == PACKAGE
        offending = {m for m in imported_modules(tree, top_level_only) if m.split(".")[0] in DOWNSTREAM}
        assert not offending, f"{path.relative_to(PACKAGE)} imports {sorted(offending)}"


def test_machinery_names_no_task():
    for name in TASK_AGNOSTIC:
        for path in [PACKAGE / name] if name.endswith(".py") else list((PACKAGE / name).rglob("*.py")):
            text = path.read_text()
            assert "mass_to_light" not in text and "MassToLight" not in text, path
