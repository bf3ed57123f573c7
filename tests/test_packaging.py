"""The install: every package of the checkout is listed for the wheel, the apps under the project's name."""

from __future__ import annotations

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
