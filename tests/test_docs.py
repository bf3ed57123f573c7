"""Documentation code runs as written: each README snippet on its own (a reader copies one), each guide's
blocks in order in one namespace (a guide builds up), then the tests a guide defines."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@functools.cache
def run_guide(guide: str) -> dict:
    """The namespace after running every code block of `guide` in order (once per session: a guide's
    blocks register classes by name)."""
    namespace: dict = {"__name__": f"guide_{guide}"}
    blocks = python_blocks(DOCS / guide)
    assert blocks, f"{guide} shows no code"
    for block in blocks:
        exec(compile(block, guide, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("guide", sorted(p.name for p in DOCS.glob("*.md")))
def test_guide_code_runs_and_its_tests_pass(guide):
    namespace = run_guide(guide)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests or guide != "write-your-own-block.md"
    for test in tests:
        test()


@pytest.mark.parametrize("index", range(len(README_SNIPPETS)))
def test_readme_snippet_runs_on_its_own(index, monkeypatch):
    monkeypatch.chdir(ROOT)  # `apps` is importable from the checkout, as the README says
    monkeypatch.syspath_prepend(str(ROOT))
    exec(compile(README_SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "readme"})


def test_the_proof_catches_a_wrong_merge():
    """The guide's harness is not a test that cannot fail: the same block with a merge that forgets the
    pool branch, or that is left unregistered, is refused with the reason."""
    import torch

    from reparam.ops import MergeableBlock
    from reparam.testing import assert_mergeable

    namespace = run_guide("write-your-own-block.md")
    good = namespace["ThreeBranch"]

    class Forgets(good):
        def forward(self, x):
            return super().forward(x) + 0.5 * self.one(x)  # a branch merged() does not know about

    namespace["register_block"](Forgets)
    with pytest.raises(AssertionError, match=r"Forgets is not equal to its deploy form.*float64"):
        assert_mergeable(Forgets(3).eval(), torch.randn(1, 3, 4, 4), max_examples=5)

    class Unregistered(MergeableBlock):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x)

        def merged(self):
            return self.conv

    with pytest.raises(AssertionError, match="register_block"), pytest.warns(UserWarning, match="not registered"):
        assert_mergeable(Unregistered(), torch.randn(1, 2, 3, 3), max_examples=2)
