"""The package's stages import only the stages before them: frontend <- analysis <- planning
<- rewrite <- runtime <- the user-facing modules (api, checkpoint, ...) <- cli. Function-level
imports count too: a deferred import is still a climb back up."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tpcompile"
ORDER = ["errors", "debug", "launch", "frontend", "analysis", "planning", "rewrite", "runtime",
         "counting", "api", "generate", "hf", "checkpoint", "verify", "suggest", "cli", "__init__", "__main__"]


def _stage(parts: list[str]) -> int:
    return ORDER.index(parts[0])


def _imports(path: Path, root: Path = PKG) -> list[tuple[list[str], int]]:
    """(target module parts relative to tpcompile, line) for every tpcompile import."""
    here = list(path.relative_to(root).with_suffix("").parts)
    package = here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            mod = base + (node.module.split(".") if node.module else [])
            targets = [mod] if node.module else [mod + [a.name] for a in node.names]
            out += [(t, node.lineno) for t in targets if t]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [(n.split(".")[1:], node.lineno) for n in names
                    if n.startswith("tpcompile.")]
    return out


def climbs(root: Path = PKG) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        me = list(path.relative_to(root).with_suffix("").parts)
        for target, line in _imports(path, root):
            if _stage(target) > _stage(me):
                out.append(f"{path.relative_to(root)}:{line} imports {'.'.join(target)}")
    return out


def test_every_import_goes_to_an_earlier_stage_or_the_same_one():
    found = climbs()
    assert not found, "imports that climb back up a stage:\n" + "\n".join(found)


def test_the_plan_value_module_imports_no_other_planning_module():
    value = PKG / "planning" / "value.py"
    inside = [t for t, _ in _imports(value) if t[0] == "planning" and t[1:] != ["value"]]
    assert not inside, inside


def test_the_check_sees_a_climb(tmp_path):
    """Planted in a copy of the package: a frontend module importing the planning stage
    inside a function is reported."""
    import shutil
    copy = tmp_path / "tpcompile"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "frontend" / "planted.py").write_text(
        "def f():\n    from ..planning import Plan\n    return Plan\n")
    assert climbs(copy) == ["frontend/planted.py:2 imports planning"]
