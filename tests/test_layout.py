"""The architecture as a rule: imports point one way, engine <- store <- jobs / serving <- CLI.

Read from the source (every ``import`` and ``from ... import``, also inside functions), so a
lazy import that runs upward is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what each part may import from the project, besides itself
# (pipeline.errors, pipeline.atomic_files and pipeline.metrics are leaves every layer may use)
ALLOWED = {
    "pipeline.errors": set(),
    "pipeline.atomic_files": set(),
    "pipeline.metrics": set(),
    "pipeline.engine": {"pipeline.errors", "pipeline.atomic_files"},
    "pipeline.store": {"pipeline.errors", "pipeline.atomic_files", "pipeline.metrics", "pipeline.engine"},
    "pipeline.shapesworld": {"pipeline.errors", "pipeline.engine"},
    "pipeline.jobs": {
        "pipeline.errors",
        "pipeline.atomic_files",
        "pipeline.metrics",
        "pipeline.engine",
        "pipeline.store",
    },
    "serving": {"pipeline.errors", "pipeline.metrics", "pipeline.engine", "pipeline.store"},
}


def part_of(module: str) -> str | None:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    return None


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(n for n in names if n.split(".")[0] in ("pipeline", "serving"))
    return found


def test_imports_point_one_way():
    wrong = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "serving").rglob("*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        part = part_of(module)
        if part is None:  # the CLI (and the package's own __init__) may import anything
            continue
        for imported in project_imports(path):
            target = part_of(imported)
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_the_cli_is_the_only_way_from_pipeline_to_serving():
    users = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "pipeline").rglob("*.py")
        if any(i.startswith("serving") for i in project_imports(p))
    }
    assert users <= {"pipeline.cli.main"}
