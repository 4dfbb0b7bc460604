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
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise DreamFlowError(f"{where}.{name} is a {type(value).__name__}, not a settings object")
            value = from_dict(hint, value, f"{where}.{name}")
        else:
            value = _typed(value, hint, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type hint (int, float, bool, str, Optional, Union, Tuple, Literal):
    settings read from files are never trusted to have the right type. Floats must be finite."""
    import math

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is None:
        return value
    if origin is typing.Union:
        for arg in args:
            try:
                return _typed(value, arg, where)
            except DreamFlowError:
                continue
        raise DreamFlowError(f"{where} = {str(value)[:40]!r} is not a valid {_hint_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                return tuple(_typed(v, args[0], where) if args else v for v in value)
            if len(args) == len(value):
                return tuple(_typed(v, a, where) for v, a in zip(value, args))
    elif origin in (list, dict) or hint in (list, dict):
        if isinstance(value, origin or hint):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise DreamFlowError(f"{where} = {value} is not a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value  # a type this reader does not know: the config's own validate() decides
    raise DreamFlowError(f"{where} = {str(value)[:40]!r} is a {type(value).__name__}, not a {_hint_name(hint)}")


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_finite(cfg, where: str = "settings") -> None:
    """Every float of a (nested) config is finite: ``NaN < lo`` and ``NaN > hi`` are both false, so range
    checks alone let NaN through. Raises a one-line DreamFlowError naming the field."""
    import math

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            check_finite(v, f"{where}.{f.name}")
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                raise DreamFlowError(f"{where}.{f.name} = {x} is not a finite number; give a finite value")


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
