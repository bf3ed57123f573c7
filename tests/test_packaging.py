"""The install: every package of the checkout is listed for the wheel, the apps under the project's name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_every_package_is_installed_and_apps_go_under_the_projects_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    mapping = {src: name for name, src in tool["package-dir"].items()}
    on_disk = set()
    for init in ROOT.glob("*/**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] in ("reparam", "apps"):
            on_disk.add(".".join((mapping.get(parts[0], parts[0]), *parts[1:])))
    assert set(tool["packages"]) == on_disk
    assert not any(p == "apps" or p.startswith("apps.") for p in tool["packages"])
    assert config["project"]["scripts"]["resrep"].startswith("reparam_apps.")


def test_the_core_does_not_require_what_only_the_apps_use():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = " ".join(config["project"]["dependencies"])
    for name in ("scikit-learn", "tqdm", "matplotlib", "pillow"):
        assert name not in core and any(name in d for d in config["project"]["optional-dependencies"]["apps"])


DISTRIBUTION = {"array_api_compat": "array-api-compat", "sklearn": "scikit-learn", "PIL": "pillow"}
"""Import names whose distribution is called otherwise."""


def _module_level_imports(path: Path) -> set[str]:
    """Third-party top-level packages a module imports when it is imported (not inside functions)."""
    found = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.If, ast.Try)):
            pending.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            pending.extend(stmt for h in getattr(node, "handlers", []) for stmt in h.body)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return {DISTRIBUTION.get(n, n) for n in found if n not in sys.stdlib_module_names and n != "reparam"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements}


def test_the_core_requires_what_it_imports_and_nothing_else():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = _names(config["project"]["dependencies"])
    extras = config["project"]["optional-dependencies"]
    imported, testing = set(), set()
    for path in (ROOT / "reparam").rglob("*.py"):
        (testing if "testing" in path.relative_to(ROOT).parts else imported).update(_module_level_imports(path))
    assert imported == core, "required dependencies must be exactly what the core imports at import time"
    assert testing <= core | _names(extras["testing"])


def test_importing_the_package_imports_no_torchvision():
    code = "import sys, reparam, reparam.graph, reparam.ops; assert 'torchvision' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
