"""Where a toy object's shape goes wrong (issue 15): the NeRF as it renders, the mesh extracted from it, and the
world's true object, seen from the same cameras.

For one prompt, make demo's NeRF stage runs (``dreamflow.demo.stage_configs``, seeded), then ``--views`` cameras
from the stage's own camera distribution (``world.TOY_CAMERA``, seed 123) render at 64 px:

* the NeRF's opacity (alpha-composited, what the guidance saw), foreground where opacity > 0.5;
* the mesh that ExtractMesh makes from it (the GLB's geometry before the mesh stage), foreground where covered;
* the true object (``world.shape_mesh``), same cameras.

Per elevation band it prints the silhouettes' mean height and width (pixels) and their IoU against the true one, so
a shape error can be placed: in the NeRF (its renders differ from the true object's at the cameras the prior
judged), or in the extraction (the renders agree, the iso-surface does not).

    .venv/bin/python bench/shape_probe.py --prompt "a yellow cylinder" --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def extent(mask: np.ndarray):
    """(height, width) of a [H, W] boolean mask's bounding box, pixels (0, 0 when empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0, 0
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a yellow cylinder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=48)
    p.add_argument("--set", action="append", default=[], help="key=value on the demo's stage configs "
                   "(nerf.* / extract.*), as in glb_fidelity.py's --variant")
    p.add_argument("--save", default=None, help="write the NeRF state here (.safetensors)")
    p.add_argument("--load", default=None, help="read a NeRF state written by --save instead of running the stage")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() // 2))

    from bench.glb_fidelity import parse_variant, pipeline_configs
    from dreamflow.demo import DemoConfig
    from dreamflow.denoisers import Denoiser
    from dreamflow.render.cameras import sample_cameras
    from dreamflow.render.mesh_render import render_mesh
    from dreamflow.render.volume import VolumeRenderConfig, render_volume
    from dreamflow.stages import run_nerf_stage
    from dreamflow.stages.extract import extract_mesh
    from dreamflow.toy import world
    from dreamflow.toy.fidelity import _iou as iou

    shape, _ = world.parse_prompt(args.prompt)
    changes = parse_variant("probe:" + ";".join(args.set))[1]
    nerf_cfg, extract_cfg, _ = pipeline_configs("apfo", DemoConfig().nerf_iterations, args.seed, changes)
    cfgs = {"nerf": nerf_cfg, "extract": extract_cfg}
    t0 = time.time()
    if args.load:
        from dreamflow.state import NeRFState

        nerf = NeRFState.load(args.load)
    else:
        den = Denoiser.load("dreamflow-toy", device="cpu")
        nerf = run_nerf_stage(den, args.prompt, "", cfgs["nerf"])
        print(f"NeRF stage {time.time() - t0:.0f} s")
    if args.save:
        nerf.save(args.save)

    cams = sample_cameras(cfgs["nerf"].camera, args.views, 64, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        nerf.field.eval()
        op = torch.cat([render_volume(nerf.field, 1.0, cams.subset(i), VolumeRenderConfig(stratified=False))["opacity"]
                        for i in range(args.views)])[..., 0].numpy() > 0.5
        v, f = extract_mesh(nerf.field.density, cfgs["extract"], radius=nerf.field.config.radius)
        v, f = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(f, dtype=torch.long)
        white = lambda pts: torch.ones_like(pts)  # noqa: E731
        ex = render_mesh(v, f, white, cams, shading="albedo")["opacity"][..., 0].numpy() > 0.5
        tv, tf = world.shape_mesh(shape)
        tr = render_mesh(tv, tf, white, cams, shading="albedo")["opacity"][..., 0].numpy() > 0.5
    print(f"extracted mesh: {v.shape[0]} vertices, bbox min {v.min(0).values.numpy().round(2)} max "
          f"{v.max(0).values.numpy().round(2)}; true bbox min {tv.min(0).values.numpy().round(2)} max "
          f"{tv.max(0).values.numpy().round(2)}")
    elev = cams.elevation.numpy()
    bands = [(-10, 15), (15, 40), (40, 65), (65, 90)]
    print("| elevation | views | true h x w (px) | NeRF h x w | mesh h x w | IoU NeRF | IoU mesh | area NeRF / true |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for lo, hi in bands:
        idx = [i for i in range(args.views) if lo <= elev[i] < hi]
        if not idx:
            continue
        def hw(masks):
            e = np.array([extent(masks[i]) for i in idx], dtype=float)
            return f"{e[:, 0].mean():.1f} x {e[:, 1].mean():.1f}"
        i_n = np.mean([iou(op[i], tr[i]) for i in idx])
        i_m = np.mean([iou(ex[i], tr[i]) for i in idx])
        area = np.mean([op[i].sum() / max(tr[i].sum(), 1) for i in idx])
        print(f"| {lo}..{hi} | {len(idx)} | {hw(tr)} | {hw(op)} | {hw(ex)} | {i_n:.3f} | {i_m:.3f} | {area:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
