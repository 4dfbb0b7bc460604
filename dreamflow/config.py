"""Dataclass configs <-> plain JSON-able dicts (for state headers, workflows and logs).

Every component has a ``@dataclass`` config whose fields carry defaults and docstrings; this module
serialises them (nested dataclasses, tuples) without pickle, and rebuilds them with type checks.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Dict, Type, TypeVar

from .errors import DreamFlowError

T = TypeVar("T")


def to_dict(cfg) -> Dict[str, Any]:
    """Nested dataclass -> dict of JSON-able values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: Type[T], data: Dict[str, Any] | None, where: str = "config") -> T:
    """Rebuild ``cls`` from :func:`to_dict` output; unknown keys are an error, missing keys take defaults."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DreamFlowError(f"{where}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def replace(cfg: T, **changes) -> T:
    """``dataclasses.replace`` that also accepts dotted keys for nested configs: ``guidance.cfg_scale=5``."""
    flat, nested = {}, {}
    for k, v in changes.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def field_docs(cls) -> Dict[str, str]:
    """Docstrings written under each field of a dataclass (for it and its bases)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                        and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
