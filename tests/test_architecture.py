"""The rooms of the code and what each may import (docs/architecture.md); the result kinds and their builders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each package of the project and the project packages it may import (itself aside). Third-party and standard
# library imports are not restricted here; docs/architecture.md explains each rule.
MAY_IMPORT: dict[str, set[str]] = {
    "cxr_triage": set(),  # the domain: vocabulary, rules, pixels, registry; imports nothing above it
    "db": {"cxr_triage"},
    "infra": {"cxr_triage", "db"},
    "listener": {"cxr_triage", "db", "infra"},
    "workers": {"cxr_triage", "db", "infra", "training"},  # training only inside the retrain task
    "worklist": {"cxr_triage", "db", "infra", "listener"},  # listener: STOW-RS takes its intake path
    "training": {"cxr_triage"},
    "service": {"cxr_triage", "db", "infra", "listener", "workers", "worklist", "training"},
}


def _project_imports(package: str) -> dict[str, list[str]]:
    """For each project package that `package` imports (anywhere, lazily too), the files that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in MAY_IMPORT and top != package:
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_its_room_allows(package: str) -> None:
    forbidden = {
        target: files for target, files in _project_imports(package).items() if target not in MAY_IMPORT[package]
    }
    assert forbidden == {}, f"{package} imports {forbidden}; allowed: {sorted(MAY_IMPORT[package])}"


def test_every_project_package_has_a_room() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(MAY_IMPORT)


def test_the_workers_do_not_import_the_worklist_and_the_listener_no_worker_code() -> None:
    assert "worklist" not in _project_imports("workers")
    assert "workers" not in _project_imports("listener")


def test_every_result_kind_has_exactly_one_builder() -> None:
    from cxr_triage.result_kinds import RESULT_KINDS
    from workers.results import BUILDERS

    assert set(BUILDERS) == set(RESULT_KINDS)
    assert all(len(name) <= 16 for name in RESULT_KINDS)  # result_objects.kind is String(16)
