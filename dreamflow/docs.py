"""Generate the README's defaults tables from the config dataclasses (field, default, docstring).

``python -m dreamflow.docs`` prints the Markdown; ``python -m dreamflow.docs --write README.md``
replaces the text between ``<!-- defaults:begin/end -->`` and ``<!-- nodes:begin/end -->`` (the node
reference, from the nodes' INPUT_TYPES and tooltips). A test checks that the README is current, so
every default the code uses is written down.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import List

from .config import field_docs

BEGIN, END = "<!-- defaults:begin -->", "<!-- defaults:end -->"
NODES_BEGIN, NODES_END = "<!-- nodes:begin -->", "<!-- nodes:end -->"


def _config_classes():
    from .denoisers.fast import FastPathConfig
    from .denoisers.memory import MemoryConfig
    from .denoisers.settings import DenoiserConfig
    from .denoisers.scene import SceneLoRAConfig
    from .export import ExportConfig
    from .guidance import GuidanceConfig
    from .render.cameras import CameraConfig
    from .render.occupancy import OccupancyConfig
    from .render.shading import ShadingConfig
    from .render.volume import VolumeRenderConfig
    from .scene.hashgrid import HashGridConfig
    from .scene.mesh import MeshModelConfig
    from .mesh_io import MeshImportConfig
    from .scene.nerf import BackgroundConfig, NeRFFieldConfig
    from .stages import ExtractConfig, MeshStageConfig, NeRFStageConfig, RefineConfig

    return [NeRFStageConfig, ExtractConfig, MeshStageConfig, RefineConfig, GuidanceConfig, SceneLoRAConfig,
            CameraConfig, NeRFFieldConfig, HashGridConfig, BackgroundConfig, VolumeRenderConfig, OccupancyConfig,
            ShadingConfig, MeshModelConfig, MeshImportConfig, ExportConfig, DenoiserConfig, MemoryConfig,
            FastPathConfig]


def _presets(cls):
    """Named instances of a config class shown as extra columns (name -> instance), or {}."""
    from .denoisers.memory import MEMORY_PRESETS, MemoryConfig

    return MEMORY_PRESETS if cls is MemoryConfig else {}


def _fmt(value) -> str:
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}(...)"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def defaults_markdown() -> str:
    out: List[str] = []
    for cls in _config_classes():
        inst = cls()
        docs = field_docs(cls)
        presets = {k: v for k, v in _presets(cls).items() if v != inst}  # "default" = the default column
        out.append(f"#### `{cls.__name__}` ({cls.__module__})\n")
        extra = "".join(f" {name} |" for name in presets)
        out.append(f"| setting | default |{extra} meaning (source) |\n|---|---|{'---|' * len(presets)}---|")
        for f in dataclasses.fields(cls):
            v = getattr(inst, f.name)
            if dataclasses.is_dataclass(v) and type(v).__name__ == "GuidanceConfig":
                g = v
                shown = f"{g.method}, t {g.t_start:g} -> {g.t_end:g}, cfg {g.cfg_scale:g}"
            else:
                shown = _fmt(v)
            doc = docs.get(f.name, "").replace("|", "\\|")
            cells = "".join(f" `{_fmt(getattr(p, f.name))}` |" for p in presets.values())
            out.append(f"| `{f.name}` | `{shown}` |{cells} {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def nodes_markdown() -> str:
    """Node reference from the pack's NODE_CLASS_MAPPINGS: inputs (type, default, tooltip) and outputs."""
    import importlib
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    nodes = importlib.import_module("nodes")
    out: List[str] = []
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        out.append(f"### {nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)} (`{node_id}`)\n")
        out.append(" ".join(getattr(cls, "DESCRIPTION", "").split()) + "\n")
        out.append("| input | type | default | what it does |\n|---|---|---|---|")
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
                kind = "choice" if isinstance(kind, (list, tuple)) else kind
                default = opts.get("default", "")
                default = f"`{default}`" if default != "" else ("(optional)" if group == "optional" else "")
                tip = " ".join(str(opts.get("tooltip", "")).split()).replace("|", "\\|")
                out.append(f"| `{name}` | {kind} | {default} | {tip} |")
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        tips = getattr(cls, "OUTPUT_TOOLTIPS", ("",) * len(cls.RETURN_TYPES))
        outs = ", ".join(f"`{n}` ({t}): {tip}" for n, t, tip in zip(names, cls.RETURN_TYPES, tips))
        out.append(f"\nOutputs: {outs or 'none (output node)'}\n")
    return "\n".join(out).rstrip() + "\n"


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"README has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{section}{end}{tail}"


def render_readme(text: str) -> str:
    """README text with both generated sections brought up to date."""
    text = replace_section(text, defaults_markdown())
    return replace_section(text, nodes_markdown(), NODES_BEGIN, NODES_END)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write"]:
        path = argv[1] if len(argv) > 1 else "README.md"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_readme(text))
        print(path)
    else:
        print(defaults_markdown() + "\n" + nodes_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
