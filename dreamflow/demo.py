"""``python -m dreamflow demo --prompt "a green cone"``: the offline end-to-end demo on the shipped toy prior.

Runs text -> NeRF (stage 1, APFO) -> mesh extraction -> mesh stage (stage 2) -> textured GLB + turntable PNG on
the CPU in a few minutes, with the prior ``models/dreamflow-toy`` (no download). The last line printed is the
GLB's path.

Two routes, same settings (:class:`DemoConfig`):

1. ``workflows/DreamFlow offline toy demo.json`` exists: it runs through the headless runner (``python -m dreamflow run``)
   with ``--set`` overrides for the prompt and seed, i.e. exactly what ComfyUI would run;
2. otherwise the stages are called directly (``run_nerf_stage``, ``extract_mesh_state``, ``run_mesh_stage``,
   ``MeshState.export_glb``).

The toy prior knows only its world: a prompt outside it is refused with the list of shapes and colours.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import List, Optional

from .errors import DreamFlowError, DreamFlowInterrupted
from .toy.demo_settings import DemoConfig, widget_values

__all__ = ["DemoConfig", "main", "run_direct", "run_workflow", "stage_configs", "workflow_sets"]

#: The toy workflow the node engineer ships (route 1 of the module docstring).
DEMO_WORKFLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                             "DreamFlow offline toy demo.json")


def stage_configs(cfg: DemoConfig):
    """(NeRFStageConfig, ExtractConfig, MeshStageConfig) of the demo: what the nodes build from the demo's widget
    values (``toy.demo_settings.widget_values``, the one mapping of :class:`DemoConfig`), through the nodes' own
    widget tables, so route 2 runs what route 1's workflow runs (the toy world's cameras included: the elevation
    widgets)."""
    from .runner.defs import load_node_pack
    from .stages import ExtractConfig, MeshStageConfig, NeRFStageConfig

    nodes = load_node_pack().nodes
    values = widget_values(cfg, prompt="")
    return (nodes.nerf_stage.WIDGETS.config(NeRFStageConfig, values["DreamFlowNeRFStage"]),
            nodes.extract_mesh.WIDGETS.config(ExtractConfig, values["DreamFlowExtractMesh"]),
            nodes.mesh_stage.WIDGETS.config(MeshStageConfig, values["DreamFlowMeshStage"]))


def run_direct(prompt: str, cfg: DemoConfig, output_dir: str, log=print) -> str:
    """Route 2: call the stages; returns the GLB path (a turntable PNG is written beside it)."""
    from .denoisers import Denoiser
    from .export import ExportConfig, turntable_path
    from .hosting import comfy_progress
    from .io import claimed_output
    from .stages import extract_mesh_state, run_mesh_stage, run_nerf_stage

    nerf_cfg, extract_cfg, mesh_cfg = stage_configs(cfg)
    t0 = time.time()
    denoiser = Denoiser.load(cfg.model, device="cpu")
    log(f"loaded {cfg.model} ({time.time() - t0:.1f} s)")
    nerf = run_nerf_stage(denoiser, prompt, "", nerf_cfg, callbacks=comfy_progress(nerf_cfg.iterations))
    log(f"NeRF stage: {cfg.nerf_iterations} updates ({time.time() - t0:.1f} s)")
    mesh = extract_mesh_state(nerf, extract_cfg)
    log(f"mesh: {mesh.vertices.shape[0]} vertices, {mesh.faces.shape[0]} faces ({time.time() - t0:.1f} s)")
    mesh = run_mesh_stage(denoiser, mesh, config=mesh_cfg, callbacks=comfy_progress(mesh_cfg.iterations))  # its prompt
    log(f"mesh stage: {cfg.mesh_iterations} updates ({time.time() - t0:.1f} s)")
    words = "_".join(prompt.lower().replace(",", " ").split()[-2:])
    name = "dreamflow/toy_" + (re.sub(r"[^a-z0-9_-]+", "_", words).strip("_-") or "object")  # the prefix rule
    with claimed_output(name, "glb", output_dir) as (glb, _):
        mesh.export_glb(glb, ExportConfig(texture_size=cfg.texture_size, turntable=cfg.turntable_views,
                                          turntable_resolution=cfg.turntable_resolution))
    log(f"turntable {turntable_path(glb)} ({time.time() - t0:.1f} s)")
    return glb


def workflow_sets(prompt: str, cfg: DemoConfig) -> List[str]:
    """``--set`` edits that make the toy workflow run exactly :class:`DemoConfig` (route 1 == route 2)."""
    return [f"{node}.{k}={v}" for node, kv in widget_values(cfg, prompt).items() for k, v in kv.items()]


def run_workflow(prompt: str, cfg: DemoConfig, output_dir: str, workflow: str = DEMO_WORKFLOW, log=print) -> str:
    """Route 1: the toy workflow through the headless runner; returns the GLB path it saved."""
    from . import hosting
    from .runner.cli import prepare, saved_files
    from .runner.execute import run_prompt

    sets = workflow_sets(prompt, cfg)
    old = os.environ.get("DREAMFLOW_OUTPUT")
    os.environ["DREAMFLOW_OUTPUT"] = os.path.abspath(output_dir)
    try:
        api, ui, defs = prepare(workflow, sets, log=lambda line: None)  # our own settings: no line per --set
        log(f"workflow {os.path.relpath(workflow)} with the demo settings (dreamflow.demo.DemoConfig)")
        with hosting.sigint_as_interrupt():
            result = run_prompt(api, defs, workflow=ui, log=log)
        files = saved_files(result.ui, hosting.output_directory())
    finally:
        if old is None:
            os.environ.pop("DREAMFLOW_OUTPUT", None)
        else:
            os.environ["DREAMFLOW_OUTPUT"] = old
    glbs = [f for f in files if f.lower().endswith(".glb")]
    if not glbs:
        raise DreamFlowError(f"the toy workflow '{workflow}' saved no .glb (saved: {files or 'nothing'}); it needs a "
                             f"DreamFlowSaveGLB node")
    for f in files:
        log(f"saved {f}")
    return glbs[-1]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m dreamflow demo``; returns the exit code (0 ok, 2 user error)."""
    from .toy.world import parse_prompt

    p = argparse.ArgumentParser(prog="python -m dreamflow demo", description="offline demo on the shipped toy prior")
    p.add_argument("--prompt", default="a red torus", help="'a <colour> <shape>' of the toy world, e.g. 'a green cone'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output folder (default: $DREAMFLOW_OUTPUT or ./output)")
    p.add_argument("--direct", action="store_true", help="call the stages directly even if the toy workflow exists")
    p.add_argument("--nerf-iterations", type=int, default=None, help="override the NeRF-stage updates")
    p.add_argument("--mesh-iterations", type=int, default=None, help="override the mesh-stage updates")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cfg = DemoConfig(seed=args.seed)
    if args.nerf_iterations is not None:
        cfg.nerf_iterations = args.nerf_iterations
    if args.mesh_iterations is not None:
        cfg.mesh_iterations = args.mesh_iterations
    from . import hosting

    output_dir = os.path.abspath(args.output or hosting.output_directory())
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("DREAMFLOW_THREADS", cfg.threads))))
    t0 = time.time()
    try:
        shape, colour = parse_prompt(args.prompt)
        prompt = args.prompt.strip().rstrip(".")
        if os.path.isfile(DEMO_WORKFLOW) and not args.direct:
            glb = run_workflow(prompt, cfg, output_dir)
        else:
            glb = run_direct(prompt, cfg, output_dir)
    except DreamFlowError as e:
        print(f"dreamflow: error: {e}", file=sys.stderr)
        return 2
    except (DreamFlowInterrupted, KeyboardInterrupt):
        print("dreamflow: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"demo: '{prompt}' ({colour} {shape}) done in {time.time() - t0:.0f} s")
    print(glb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
