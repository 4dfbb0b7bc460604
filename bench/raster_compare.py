"""Compare DreamFlow's two rasterizer backends (nvdiffrast "cuda" vs pure "torch"): agreement and speed.

Scenes: a cube (12 faces) and a UV sphere with 50,000 faces, V views each, at 512 and 1024 pixels.
For each it prints ms per call (rasterize, interpolate, antialias, forward + backward of all three) and,
when nvdiffrast is available, the differences between backends:

* ``id agree``: fraction of pixels with the same triangle id (differences: fill rules on edges);
* ``rast``: max |u, v, z/w| difference on pixels where the ids agree;
* ``interp``: max |interpolated attribute| difference there;
* ``g_attr`` / ``g_pos``: max |gradient| difference of a random linear loss on those pixels, relative to
  the largest gradient (interpolation path: both backends differentiate the same barycentrics);
* ``aa cos``: cosine between the two backends' antialias position gradients (the torch antialias is an
  independent derivation, so this is a similarity, not an identity).

Run on a GPU machine:  python bench/raster_compare.py        (CPU: torch backend only, smaller default)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamflow import backends  # noqa: E402
from dreamflow.render.cameras import make_cameras  # noqa: E402
from dreamflow.render.mesh_render import clip_positions  # noqa: E402
from dreamflow.render.raster import antialias, antialias_topology, interpolate, rasterize  # noqa: E402
from dreamflow.scene.mesh import box_mesh, uv_sphere, vertex_normals  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(result of the last call, mean ms per call) after one warm-up call."""
    out = fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1000 / repeats


def scene(name, device, views, res):
    v, f = box_mesh(0.5) if name == "cube" else uv_sphere(126, 200)
    el = torch.linspace(-20, 40, views).tolist()
    az = torch.linspace(15, 15 + 360 * (views - 1) / views, views).tolist()
    cams = make_cameras(el, az, 2.2, 45.0, res, res)
    pos = clip_positions(v, cams).to(device).contiguous()
    attr = torch.cat([v, vertex_normals(v, f)], 1).to(device).contiguous()
    return pos, f.to(device).int().contiguous(), attr


def run_backend(backend, pos, tri, attr, res, weights, repeats, device):
    """Timings and outputs of one backend; ``weights`` [V, H, W, 6] define the scalar loss."""
    topo = antialias_topology(tri, backend)
    rast, t_rast = timed(lambda: rasterize(pos, tri, (res, res), backend=backend), device, repeats)
    inter, t_int = timed(lambda: interpolate(attr, rast, tri, backend=backend), device, repeats)
    color = inter[..., 3:6] * 0.5 + 0.5
    _, t_aa = timed(lambda: antialias(color, rast, pos, tri, backend=backend, topology=topo), device, repeats)

    def fwd_bwd():
        p = pos.clone().requires_grad_(True)
        a = attr.clone().requires_grad_(True)
        r = rasterize(p, tri, (res, res), backend=backend)
        i = interpolate(a, r, tri, backend=backend)
        (i * weights).sum().backward()
        return p.grad, a.grad

    (g_pos, g_attr), t_fb = timed(fwd_bwd, device, repeats)
    p = pos.clone().requires_grad_(True)
    r = rasterize(p, tri, (res, res), backend=backend)
    aa = antialias(torch.ones_like(r[..., :1]) * (r[..., 3:] > 0), r, p, tri, backend=backend, topology=topo)
    (aa * weights[..., :1]).sum().backward()
    return dict(rast=rast, inter=inter, g_pos=g_pos, g_attr=g_attr, g_aa=p.grad,
                ms=(t_rast, t_int, t_aa, t_fb))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 512 1024 (GPU) / 512 (CPU)")
    ap.add_argument("--views", type=int, default=None, help="views per call; default 4 (GPU) / 1 (CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after a warm-up; default 10 (GPU) / 2 (CPU)")
    args = ap.parse_args()

    dr = backends.nvdiffrast_torch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    resolutions = args.resolutions or ([512, 1024] if gpu else [512])
    views = args.views or (4 if gpu else 1)
    repeats = args.repeats or (10 if gpu else 2)
    names = ["torch"] + (["cuda"] if dr is not None else [])
    print(f"device: {torch.cuda.get_device_name(device) if gpu else 'cpu'}; torch {torch.__version__}; "
          f"views per call: {views}; repeats: {repeats}")
    print("nvdiffrast: " + ("available" if dr is not None else "unavailable"))

    timing_rows, diff_rows = [], []
    for name in ("cube", "sphere50k"):
        for res in resolutions:
            pos, tri, attr = scene(name, device, views, res)
            g = torch.Generator(device="cpu").manual_seed(0)
            weights = torch.randn(views, res, res, 6, generator=g).to(device)
            if dr is not None:  # compare only where both backends see the same triangle
                agree = (rasterize(pos, tri, (res, res), backend="torch")[..., 3]
                         == rasterize(pos, tri, (res, res), backend="cuda")[..., 3])
                weights = weights * agree.unsqueeze(-1)
            out = {b: run_backend(b, pos, tri, attr, res, weights, repeats, device) for b in names}
            for b in names:
                timing_rows.append((name, res, b) + tuple(out[b]["ms"]))
            if dr is not None:
                t, c = out["torch"], out["cuda"]
                same = t["rast"][..., 3] == c["rast"][..., 3]
                both = same & (t["rast"][..., 3] > 0)
                rel = lambda x, y: ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()  # noqa: E731
                cos = torch.nn.functional.cosine_similarity(t["g_aa"].flatten(), c["g_aa"].flatten(), dim=0).item()
                diff_rows.append((name, res, same.float().mean().item(),
                                  (t["rast"][both][:, :3] - c["rast"][both][:, :3]).abs().max().item(),
                                  (t["inter"][both] - c["inter"][both]).abs().max().item(),
                                  rel(t["g_attr"], c["g_attr"]), rel(t["g_pos"], c["g_pos"]), cos))
            del out
            if gpu:
                torch.cuda.empty_cache()

    print("\nms per call")
    print(f"{'scene':<10} {'res':>5} {'backend':<7} {'raster':>9} {'interp':>9} {'antialias':>9} {'fwd+bwd':>9}")
    for r in timing_rows:
        print(f"{r[0]:<10} {r[1]:>5} {r[2]:<7} {r[3]:>9.2f} {r[4]:>9.2f} {r[5]:>9.2f} {r[6]:>9.2f}")
    if diff_rows:
        print("\ntorch vs nvdiffrast")
        print(f"{'scene':<10} {'res':>5} {'id agree':>9} {'rast':>9} {'interp':>9} {'g_attr':>9} {'g_pos':>9} {'aa cos':>7}")
        for r in diff_rows:
            print(f"{r[0]:<10} {r[1]:>5} {r[2]:>9.5f} {r[3]:>9.2e} {r[4]:>9.2e} {r[5]:>9.2e} {r[6]:>9.2e} {r[7]:>7.3f}")


if __name__ == "__main__":
    main()
