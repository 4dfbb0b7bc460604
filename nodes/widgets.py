"""One declarative widget table per node: each row names a widget, the config field it sets, its range and
(optionally) its tooltip. The table generates the node's ``INPUT_TYPES`` widgets and the config its ``run()``
builds, so a new widget is one row::

    TABLE = WidgetTable(
        Widget("iterations", "iterations", lo=1, hi=100000),                  # tooltip: the field's docstring
        Widget("cfg_scale", "guidance.cfg_scale", "FLOAT", 1.0, 100.0, 0.5, "Classifier-free guidance scale."),
        Widget("preview_views", kind="INT", lo=1, hi=64, default=8, tooltip="..."),  # the node's own (no field)
    )
    TABLE.inputs(MeshStageConfig())          # {"iterations": ("INT", {...}), ...} in row order
    TABLE.config(MeshStageConfig, values)    # MeshStageConfig with the widgets' values, validated

Defaults come from the config instance (the engine's defaults); a row without a tooltip shows the config field's
docstring (``dreamflow.config.field_docs``, the text the README's defaults tables print).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from dreamflow.config import field_docs

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Widget:
    """One widget of a node.

    Attributes:
        name: the widget's name (its position in the table is its position in saved workflows: never reorder).
        path: the dotted config field it sets (``"guidance.cfg_scale"``); None = the node uses the value itself.
        kind: "INT", "FLOAT", "BOOLEAN", "STRING" or "COMBO" (``choices`` then lists the values).
        lo, hi, step: the range of INT / FLOAT widgets.
        tooltip: shown on hover; None = the config field's docstring.
        default: the widget's default; none given = the config field's value (required without a ``path``, except
            for a COMBO: ComfyUI then shows its first choice, as for a list of this machine's files).
        options: extra widget options (``multiline``, ``control_after_generate``, ...).
        to_config: maps the widget value to the field value (e.g. ``bool``); identity when None.
        choices: the COMBO values (a tuple, or a function returning them when INPUT_TYPES is asked).
        index: the widget sets this element of a tuple field (``camera.elevation_range``'s min / max: two widgets,
            one field); the table joins the elements, the field's value filling any not given.
    """

    name: str
    path: Optional[str] = None
    kind: str = "INT"
    lo: Optional[float] = None
    hi: Optional[float] = None
    step: Optional[float] = None
    tooltip: Optional[str] = None
    default: Any = _NO_DEFAULT
    options: Dict[str, Any] = field(default_factory=dict)
    to_config: Optional[Callable[[Any], Any]] = None
    choices: Any = None
    index: Optional[int] = None

    def spec(self, config: Any) -> tuple:
        """The ``INPUT_TYPES`` entry: ``(type, options)``."""
        value = self.default if self.default is not _NO_DEFAULT or self.path is None else _get(config, self.path)
        if value is _NO_DEFAULT and self.kind != "COMBO":
            raise ValueError(f"widget '{self.name}' has neither a config path nor a default")
        if self.index is not None and self.default is _NO_DEFAULT:
            value = value[self.index]
        tooltip = self.tooltip if self.tooltip is not None else _doc(config, self.path)
        if self.kind == "COMBO":
            choices = self.choices() if callable(self.choices) else self.choices
            default = {} if value is _NO_DEFAULT else {"default": value}
            return (list(choices), {**default, "tooltip": tooltip, **self.options})
        opts: Dict[str, Any] = {"default": _cast(self.kind, value)}
        if self.kind in ("INT", "FLOAT"):
            opts.update({"min": self.lo, "max": self.hi})
            if self.step is not None:
                opts["step"] = self.step
        if self.kind == "FLOAT":
            opts["round"] = False
        opts.update(self.options)
        opts["tooltip"] = tooltip
        return (self.kind, opts)


class WidgetTable:
    """The widgets of one node, in order (see the module docstring)."""

    def __init__(self, *rows: Widget):
        names = [r.name for r in rows]
        assert len(set(names)) == len(names), f"duplicate widget names in {names}"
        self.rows: Tuple[Widget, ...] = tuple(rows)

    def __add__(self, other: "WidgetTable") -> "WidgetTable":
        return WidgetTable(*self.rows, *other.rows)

    def inputs(self, config: Any = None) -> Dict[str, tuple]:
        """``INPUT_TYPES`` entries of the widgets, in table order (defaults read from ``config``; None for a table
        whose rows set no config field)."""
        return {r.name: r.spec(config) for r in self.rows}

    def changes(self, values: Dict[str, Any]) -> Dict[str, Any]:
        """Dotted config changes (:func:`dreamflow.config.replace`) from widget values (rows with a path); rows
        with an ``index`` give one element of their field each (``changes(values, config)``: the others from
        ``config``, else a placeholder ``None``)."""
        return self._changes(values, None)

    def _changes(self, values: Dict[str, Any], config: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for r in self.rows:
            if r.path is None or r.name not in values:
                continue
            value = r.to_config(values[r.name]) if r.to_config else values[r.name]
            if r.index is None:
                out[r.path] = value
                continue
            parts = list(out.get(r.path) or (_get(config, r.path) if config is not None else ()))
            parts += [None] * (r.index + 1 - len(parts))
            parts[r.index] = _cast(r.kind, value)
            out[r.path] = tuple(parts)
        return out

    def config(self, cls, values: Dict[str, Any]):
        """``cls()`` with the widgets' values, validated (ranges, and every float finite: bad values raise before
        any work)."""
        from dreamflow.config import check_finite, replace

        config = replace(cls(), **self._changes(values, cls())).validate()
        check_finite(config, cls.__name__)
        return config

    @property
    def names(self) -> Sequence[str]:
        return [r.name for r in self.rows]

    def method(self, *sockets: str, optional: Sequence[str] = ()):
        """Decorator of a node's FUNCTION written as ``run(self, <sockets>, <optional>=None, **widgets)``: its
        signature becomes ``(self, <sockets>, <every widget of the table>, <optional>=None)``, the order of
        ``INPUT_TYPES`` (what ComfyUI passes and the node contract test reads), and calls are bound to it, so a
        missing or unknown input fails as with a hand-written signature."""
        P = inspect.Parameter
        sig = inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD)]
                                + [P(n, P.POSITIONAL_OR_KEYWORD) for n in (*sockets, *self.names)]
                                + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in optional])
        names = set(self.names)

        def decorate(fn):
            @functools.wraps(fn)
            def run(*args, **kwargs):
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                given = dict(bound.arguments)
                widgets = {n: given.pop(n) for n in list(given) if n in names}
                return fn(**given, **widgets)

            run.__signature__ = sig
            return run

        return decorate


def _get(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _doc(config: Any, path: Optional[str]) -> str:
    if path is None:
        return ""
    *parents, name = path.split(".")
    owner = _get(config, ".".join(parents)) if parents else config
    return field_docs(type(owner)).get(name, "") if dataclasses.is_dataclass(owner) else ""


def _cast(kind: str, value: Any) -> Any:
    return {"INT": int, "FLOAT": float, "BOOLEAN": bool}.get(kind, lambda v: v)(value)
