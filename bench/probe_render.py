"""Stage-1 render alone on the GPU: 4 x 256 px, default NeRF field and sampling, forward + backward, with and
without the occupancy grid (ms, peak GiB, occupied fraction). ``PYTHONPATH=. python bench/probe_render.py``"""
import time, torch
from dreamflow.scene.nerf import NeRFField
from dreamflow.render.occupancy import OccupancyGrid
from dreamflow.render.volume import render_volume, VolumeRenderConfig
from dreamflow.render.cameras import sample_cameras, CameraConfig
dev = "cuda" if torch.cuda.is_available() else "cpu"; res = 256 if dev == "cuda" else 32
f = NeRFField().to(dev).train(); gen = torch.Generator(dev).manual_seed(0)
g = OccupancyGrid.from_field(f, generator=gen)
cams = sample_cameras(CameraConfig(), 4, res, generator=torch.Generator().manual_seed(0)).to(dev)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for occ in (None, g):
    for i in range(8):
        if i == 3:
            sync(); t = time.time()
            if dev == "cuda": torch.cuda.reset_peak_memory_stats()
        out = render_volume(f, 1.0, cams, VolumeRenderConfig(), generator=gen, occupancy=occ)
        out["rgb"].sum().backward()
    sync()
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0
    print("grid" if occ else "none", f"{(time.time() - t) / 5 * 1e3:.1f} ms fwd+bwd, {mem:.1f} GiB, occupied {g.fraction_occupied():.3f}")
