"""Every package declares what its code imports: each third-party distribution a module of a package imports
(at any depth, lazily or not) is in that package's dependencies or one of its extras."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (REPO / "packages").iterdir() if (p / "pyproject.toml").is_file())
# Imported only where the optional dependency is known to be present, and declared as an extra upstream of
# a name that is not the distribution's (or not installed here to map it).
_OPTIONAL_MODULES = {"vllm": "vllm", "modelscope": "modelscope", "megatron": "megatron-core", "tinker": "tinker"}


def _declared(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_normalize(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]) for spec in specs}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(src: Path) -> set[str]:
    found = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_imported_distribution_is_declared(package):
    distributions = importlib.metadata.packages_distributions()
    declared = _declared(package / "pyproject.toml")
    missing = []
    for module in sorted(_imported_modules(package / "src")):
        if module in sys.stdlib_module_names or module in ("twinkle", "twinkle_client", "__future__"):
            continue
        names = [_OPTIONAL_MODULES[module]] if module in _OPTIONAL_MODULES else distributions.get(module, [module])
        if not {_normalize(n) for n in names} & declared:
            missing.append(f"{module} ({', '.join(names)})")
    assert not missing, f"{package.name} imports undeclared distributions: {missing}"
