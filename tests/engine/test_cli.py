"""Generated command lines: one flag per config field, each described by the field's documentation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from apps.engine.cli import add_dataclass_args, config_from_args, field_docs
from apps.resrep.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_generated_flag_is_described_in_words():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if action.dest in ("help",) or not action.option_strings:
                continue
            assert action.help and "." not in action.help.split()[0], (name, action.dest, action.help)
            assert len(action.help.split()) >= 2, (name, action.dest, action.help)


def test_a_field_without_documentation_is_refused():
    @dataclasses.dataclass
    class Settings:
        """Two knobs."""

        alpha: float = 1.0
        """How much."""
        beta: int = 2

    assert field_docs(Settings) == {"alpha": "How much."}
    with pytest.raises(TypeError, match=r"Settings\.beta has no documentation"):
        add_dataclass_args(argparse.ArgumentParser(), Settings)


def test_flags_map_one_to_one_onto_the_fields():
    @dataclasses.dataclass
    class Settings:
        """Knobs."""

        rate: float = 0.5
        """A rate."""
        limit: int | None = None
        """A limit (none: no limit)."""
        fast: bool = False
        """Go fast."""

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Settings)
    got = config_from_args(Settings, parser.parse_args(["--rate", "0.25", "--limit", "none", "--fast"]))
    assert got == Settings(rate=0.25, limit=None, fast=True)
    assert config_from_args(Settings, parser.parse_args(["--limit", "3"])).limit == 3
