"""The package's import graph keeps its floors: no import climbs a floor, no module cycle.

The graph is read from the source (every ``import`` / ``from ... import``, also those inside functions), so a
new module or a new import is checked without editing this file, unless it adds a new top-level piece (then
give it a floor in :data:`FLOORS`).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The floors, ground first. A module may import its own piece and the pieces of lower floors only.
#: Pieces are ``dreamflow``'s sub-packages / modules, and the ComfyUI adapters ``nodes``.
FLOORS = [
    {"errors", "seeding", "config", "io", "hosting", "compile_cache", "backends", "node_defs"},  # ground: no engine imports
    {"scene", "denoisers"},      # fields, meshes; the pretrained models and the scene LoRA
    {"render", "guidance"},      # renderers of scenes; guidance methods on denoisers
    {"export", "toy"},           # GLB export; the toy world and prior
    {"state"},                   # NeRF / mesh states (render, export)
    {"mesh_io"},                 # meshes from / to files and other packs' types, as mesh states
    {"stages"},                  # the stages (the engine's top)
    {"nodes", "docs"},           # ComfyUI adapters; the README generator reads configs
    {"runner"},                  # the headless host: loads nodes/ by path, as ComfyUI does
    {"demo"},                    # the offline demo (runs the toy workflow through the runner)
    {"__main__"},                # the command line
]
FLOOR = {piece: i for i, names in enumerate(FLOORS) for piece in names}


def _modules() -> Dict[str, str]:
    """Module name -> file, for dreamflow/ and nodes/."""
    out = {}
    for top in ("dreamflow", "nodes"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(folder, f)
    return out


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def piece(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] == "nodes":
        return "nodes"
    return parts[1] if len(parts) > 1 else "dreamflow"


def test_graph_is_read():
    g = import_graph()
    assert "dreamflow.stages.loop" in g and "dreamflow.guidance" in g["dreamflow.stages.loop"]
    assert "dreamflow.render.volume" in g["dreamflow.state"]


def test_every_piece_has_a_floor():
    pieces = {piece(m) for m in import_graph()} - {"dreamflow"}
    assert pieces <= set(FLOOR), f"give these a floor in FLOORS: {sorted(pieces - set(FLOOR))}"


def test_no_import_climbs_a_floor():
    up = []
    for mod, targets in import_graph().items():
        for t in targets:
            a, b = piece(mod), piece(t)
            if b == "dreamflow":  # the package's own __init__ (lazy attribute access only)
                continue
            if a != "dreamflow" and FLOOR[b] > FLOOR[a]:
                up.append(f"{mod} -> {t}")
    assert not up, "imports that climb a floor:\n" + "\n".join(sorted(up))


def test_no_import_cycles():
    g = import_graph()
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in g}
    cycles = []

    def visit(m, path):
        colour[m] = GREY
        for t in sorted(g[m]):
            if colour[t] == GREY:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif colour[t] == WHITE:
                visit(t, path + [t])
        colour[m] = BLACK

    for m in sorted(g):
        if colour[m] == WHITE:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
