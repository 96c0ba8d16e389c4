"""Arrows between the packages point down only (docs/architecture.md, "Layers").

Every import in every module is parsed (function-level and ``TYPE_CHECKING`` imports
included: a lazy upward import is still an upward arrow) and checked against the table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the packages it may import (besides itself and the root's ``__version__``)
ALLOWED: dict[str, set[str]] = {
    "mmconvert.errors": set(),
    "mmconvert.formats": {"mmconvert.errors"},
    "mmconvert.publish": {"mmconvert.errors", "mmconvert.formats"},
    "mmconvert.runtime": {"mmconvert.errors", "mmconvert.formats"},
    "mmconvert.convert": {"mmconvert.errors", "mmconvert.formats", "mmconvert.publish"},
    "mmconvert.verify": {"mmconvert.errors", "mmconvert.formats", "mmconvert.publish",
                         "mmconvert.convert", "mmconvert.runtime"},
    "mmconvert.api": {"mmconvert.errors", "mmconvert.formats", "mmconvert.publish",
                      "mmconvert.runtime", "mmconvert.convert", "mmconvert.verify"},
}
TOP = {"mmconvert.cli", "mmconvert.commands", "mmconvert.__main__"}  # may import anything
FOLDERS = {"formats": "mmconvert.formats", "publish": "mmconvert.publish",
           "runtime": "mmconvert.runtime", "convert": "mmconvert.convert",
           "verify": "mmconvert.verify"}


def _package_of_file(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] in FOLDERS:
        return FOLDERS[rel.parts[0]]
    if rel.parts[0] == "mmconvert":
        stem = rel.parts[1].removesuffix(".py")
        return f"mmconvert.{stem}" if stem != "__init__" else "mmconvert"
    return rel.parts[0]


def _package_of_module(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "mmconvert" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "mmconvert":  # ``from mmconvert import errors``
                found += [(node.lineno, f"mmconvert.{a.name}") for a in node.names
                          if a.name != "__version__"]
    return found


def _sources() -> list[Path]:
    roots = [*FOLDERS, "mmconvert"]
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py")
                  if "templates" not in p.parts)


def is_upward(here: str, module: str) -> bool:
    """Whether package ``here`` importing ``module`` breaks the table."""
    there = _package_of_module(module)
    if here in TOP or here == "mmconvert" or not there.startswith("mmconvert"):
        return False
    return there not in (here, "mmconvert") and there not in ALLOWED.get(here, set())


def upward_arrows() -> list[str]:
    return [f"{path.relative_to(REPO)}:{line}: {_package_of_file(path)} imports {module}"
            for path in _sources() for line, module in _imports(path)
            if is_upward(_package_of_file(path), module)]


def test_arrows_point_down_only():
    wrong = upward_arrows()
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_bench_does_not_import_tests():
    wrong = [f"{p.relative_to(REPO)}:{line}: {module}"
             for p in sorted((REPO / "bench").rglob("*.py"))
             for line, module in _imports(p) if module.split(".")[0] == "tests"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, module, expected", [
    ("formats/x.py", "mmconvert.convert.model", True),
    ("formats/x.py", "mmconvert.errors", False),
    ("formats/x.py", "mmconvert", False),
    ("convert/x.py", "mmconvert.verify.fusion", True),
    ("convert/x.py", "mmconvert.formats.quants", False),
    ("verify/x.py", "mmconvert.convert.model", False),
    ("runtime/x.py", "mmconvert.verify.reference", True),
    ("publish/x.py", "mmconvert.convert.model", True),
    ("mmconvert/commands/x.py", "mmconvert.verify.harness", False),
    ("mmconvert/api.py", "mmconvert.commands.core", True),
])
def test_the_checker_sees_an_upward_arrow(source, module, expected):
    assert is_upward(_package_of_file(REPO / source), module) is expected


def test_the_checker_reads_lazy_and_type_checking_imports(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from mmconvert.convert.model import CanonicalModel\n"
                       "def f():\n    import mmconvert.verify.harness\n")
    assert [m for _, m in _imports(planted)] == [
        "typing", "mmconvert.convert.model", "mmconvert.verify.harness"]
