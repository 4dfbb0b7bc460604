"""Quality benchmark on the toy world: R-precision of generated objects for APFO / SDS / VSD at equal update budgets.

For every (method, budget, prompt): run the NeRF stage with the shipped toy prior (same settings, seed and CFG for
all methods, only the guidance differs), render the object from 8 turntable views at 64 px (volume rendering,
white background), and score the views with the world's classifier (``models/dreamflow-toy/classifier``, trained
on held-out views with background / colour jitter). An object counts when its prompt is the top one of the 42
world prompts (R-precision, R = 1; the views' log-probabilities are summed). Writes ``toy_quality.json``, the
plot ``toy_quality.png`` (score vs updates) and a markdown table.

GPU (the ``device`` tool; workers share one GPU, a shared job queue, a wall-clock deadline)::

    python3 bench/toy_quality.py --device cuda --workers 12 --out $OUT --deadline-s 480

CPU (reduced prompt list and budgets; a few minutes per run on 2 cores)::

    .venv/bin/python bench/toy_quality.py --reduced --budgets 50 100 --out bench/toy_quality_cpu

Settings (ours; equal for every method): 64 px renders, 2 views per update, hash grid 8 levels x 2^15,
32 + 32 samples per ray, lr grid 3e-2 / MLP 1e-2 (short runs), CFG 7.5 (the stages' common default). APFO runs
its schedule t 1.0 -> 0.2 over the budget (paper stage 1); SDS and VSD draw t ~ U[0.02, 0.98] (threestudio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.jobpool import load_toy, run_jobs, serve  # noqa: E402

METHODS = ("apfo", "sds", "vsd")


def prompt_list(reduced: bool):
    """(shape, colour) pairs: all 42, or a reduced 7 (every shape once, every colour at least once)."""
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES

    if reduced:
        return [(s, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, s in enumerate(SHAPES)]
    return [(s, c) for s in SHAPES for c in COLOUR_NAMES]


#: --lora-shares-noise reaches the worker processes through this variable (APFO's GuidanceConfig.lora_shares_noise).
SHARES_ENV = "DREAMFLOW_TOY_LORA_SHARES_NOISE"


def stage_config(method: str, budget: int, seed: int, resolution: int):
    from dreamflow.guidance import GuidanceConfig
    from dreamflow.render.volume import VolumeRenderConfig
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import NeRFFieldConfig
    from dreamflow.stages import NeRFStageConfig

    t = (1.0, 0.2) if method == "apfo" else (0.98, 0.02)
    return NeRFStageConfig(
        iterations=budget, views_per_update=2, resolution=resolution, denoise_resolution=64, seed=seed,
        lr_grid=3e-2, lr_mlp=1e-2,
        guidance=GuidanceConfig(method=method, cfg_scale=7.5, t_start=t[0], t_end=t[1],
                                lora_shares_noise=os.environ.get(SHARES_ENV, "on") == "on"),
        nerf=NeRFFieldConfig(grid=HashGridConfig(n_levels=8, log2_hashmap_size=15)),
        render=VolumeRenderConfig(n_samples=32, n_importance=32))


def run_job(denoiser, classifier, job, resolution: int):
    """One generated object -> its per-view log-probs [V, 7, 6] and timing."""
    from dreamflow.render.cameras import orbit_cameras
    from dreamflow.render.volume import render_volume
    from dreamflow.stages import run_nerf_stage
    from dreamflow.toy.world import caption

    method, budget, shape, colour, seed = job
    cfg = stage_config(method, budget, seed, resolution)
    t0 = time.time()
    state = run_nerf_stage(denoiser, caption(shape, colour), "", cfg)
    if denoiser.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    cams = orbit_cameras(8, 64).to(denoiser.device)
    with torch.no_grad():
        out = render_volume(state.field, (1.0, 1.0, 1.0), cams, cfg.render)
        lp = classifier.log_probs(out["rgb"].permute(0, 3, 1, 2).float())
    return {"job": list(job), "log_probs": lp.cpu().tolist(), "seconds": seconds,
            "coverage": float(out["opacity"].mean())}, out["rgb"][0].cpu()


def worker(jobs, results, device: str, resolution: int, threads: int):
    den, clf = load_toy(device, threads, device)

    def run(job):
        res, img = run_job(den, clf, job, resolution)
        res["preview"] = (img.clamp(0, 1) * 255).round().to(torch.uint8).tolist()
        return res

    serve(jobs, results, run)


def summarise(rows, prompts, budgets):
    from dreamflow.toy.classifier import r_precision
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES

    table = {}
    for method in METHODS:
        for b in budgets:
            got = [r for r in rows if r["job"][0] == method and r["job"][1] == b and "log_probs" in r]
            if not got:
                continue
            lp = torch.tensor([r["log_probs"] for r in got])
            targets = [(SHAPES.index(r["job"][2]), COLOUR_NAMES.index(r["job"][3])) for r in got]
            score = r_precision(lp, targets)
            score.update({"n": len(got), "of": len(prompts), "seconds_mean": sum(r["seconds"] for r in got) / len(got)})
            table.setdefault(method, {})[str(b)] = score
    return table


def plot(table, budgets, path):
    """score vs updates, one line per method (PIL only: matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    W, H, m = 560, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colours = {"apfo": (200, 30, 30), "sds": (30, 90, 200), "vsd": (30, 150, 60)}
    xs = {b: m + (W - 2 * m) * i / max(1, len(budgets) - 1) for i, b in enumerate(budgets)}

    def y(v):
        return H - m - (H - 2 * m) * v

    d.line([(m, m), (m, H - m), (W - m, H - m)], fill="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([(m - 4, y(v)), (W - m, y(v))], fill=(225, 225, 225))
        d.text((8, y(v) - 6), f"{v:.2f}", fill="black")
    for b, x in xs.items():
        d.text((x - 10, H - m + 8), str(b), fill="black")
    d.text((W // 2 - 60, H - 22), "updates (NeRF stage)", fill="black")
    d.text((m, 12), "toy world R-precision (42 prompts, classifier judge)", fill="black")
    for k, method in enumerate(METHODS):
        pts = [(xs[int(b)], y(s["r_precision"])) for b, s in sorted(table.get(method, {}).items(), key=lambda kv: int(kv[0]))]
        if len(pts) > 1:
            d.line(pts, fill=colours[method], width=3)
        for px, py in pts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colours[method])
        d.text((W - m - 60, m + 14 * k), method, fill=colours[method])
    img.save(path)


def preview_grid(rows, path):
    """First turntable view of every finished object: rows = (method, budget), columns = prompts."""
    from PIL import Image

    keys = sorted({(r["job"][0], r["job"][1]) for r in rows if "preview" in r}, key=lambda k: (METHODS.index(k[0]), k[1]))
    prompts = sorted({(r["job"][2], r["job"][3]) for r in rows if "preview" in r})
    if not keys or not prompts:
        return
    grid = Image.new("RGB", (64 * len(prompts), 64 * len(keys)), "white")
    for r in rows:
        if "preview" not in r:
            continue
        i, j = keys.index((r["job"][0], r["job"][1])), prompts.index((r["job"][2], r["job"][3]))
        arr = torch.tensor(r["preview"], dtype=torch.uint8).numpy()
        grid.paste(Image.fromarray(arr), (64 * j, 64 * i))
    grid.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budgets", nargs="+", type=int, default=[25, 50, 100, 200])
    p.add_argument("--reduced", action="store_true", help="7 prompts (every shape once) instead of all 42")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=1e9, help="stop collecting after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "bench"))
    p.add_argument("--lora-shares-noise", choices=["on", "off"], default="on",
                   help="APFO: GuidanceConfig.lora_shares_noise (default on, as the stages)")
    args = p.parse_args(argv)
    os.environ[SHARES_ENV] = args.lora_shares_noise

    prompts = prompt_list(args.reduced)
    budgets = sorted(args.budgets)
    # Cheap jobs first, methods and prompts interleaved, so a deadline cuts the largest budget evenly.
    jobs_list = [(m, b, s, c, args.seed) for b in budgets for (s, c) in prompts for m in args.methods]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows = run_jobs(jobs_list, worker, (args.device, args.resolution, args.threads), args.workers, args.deadline_s,
                    lambda r: f"{r['seconds']:.1f} s")
    table = summarise(rows, prompts, budgets)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"settings": vars(args), "device": device_name, "prompts": prompts, "table": table,
           "errors": [r for r in rows if "error" in r], "wall_s": time.time() - t0,
           "runs": [{k: v for k, v in r.items() if k != "preview"} for r in rows]}
    with open(os.path.join(args.out, "toy_quality.json"), "w") as f:
        json.dump(out, f)
    plot(table, budgets, os.path.join(args.out, "toy_quality.png"))
    preview_grid(rows, os.path.join(args.out, "toy_quality_objects.png"))
    lines = ["| method | " + " | ".join(f"{b} updates" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in args.methods:
        cells = []
        for b in budgets:
            s = table.get(m, {}).get(str(b))
            cells.append("-" if s is None else f"{s['r_precision']:.2f} (shape {s['shape']:.2f}, colour {s['colour']:.2f}; "
                                               f"{s['n']}/{s['of']}, {s['seconds_mean']:.0f} s)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table_md = "\n".join(lines)
    with open(os.path.join(args.out, "toy_quality.md"), "w") as f:
        f.write(table_md + "\n")
    print(f"\nR-precision (R = 1, 42 world prompts as candidates; device {device_name}; {time.time() - t0:.0f} s)\n")
    print(table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
