"""What every app's command line shares: one flag per field of a config dataclass, typed from its
annotations, defaulting to the field's default and described by the field's documentation (the string
literal written under the field)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing

__all__ = ["add_dataclass_args", "config_from_args", "field_docs", "flag"]


def flag(name: str) -> str:
    """``flops_target`` → ``--flops-target``."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field of dataclass `cls`: the string literal right under the field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass `cls`, in a group named after it; a field without documentation
    is a TypeError (every flag says what it does)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no documentation (a string literal under the field)")
        tp, default, doc = hints[f.name], f.default, docs[f.name].replace("%", "%%")
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
        if tp is bool:
            group.add_argument(
                flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc
            )
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(flag(f.name), dest=f.name, choices=typing.get_args(tp), default=default, help=doc)
        elif tp in (int, float, str):

            def none_or(text: str, _tp=tp):  # "none" selects the field's None meaning
                return None if text.lower() == "none" else _tp(text)

            group.add_argument(
                flag(f.name),
                dest=f.name,
                type=none_or if optional else tp,
                default=default,
                help=doc,
                metavar=tp.__name__.upper() + ("|none" if optional else ""),
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp}")


def config_from_args(cls: type, ns: argparse.Namespace):
    """The `cls` instance the parsed flags describe."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
