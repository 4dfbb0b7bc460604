"""GLB fidelity benchmark on the toy world (issue 15): the exported GLB against the world's true object.

For every job (method, variant, NeRF-stage budget, prompt, seed) this runs the demo pipeline a user runs
(``dreamflow.demo.stage_configs``: NeRF stage -> ExtractMesh -> mesh stage -> textured GLB), then scores the GLB
file with ``dreamflow.toy.fidelity.glb_fidelity`` (silhouette IoU from 10 views incl. top and bottom, hole IoU of
the torus, Chamfer, CIEDE2000 colour error, floaters, the world classifier's R-precision) and counts the objects
that pass ``fidelity.THRESHOLDS``. Every method runs the same pipeline and settings (APFO's and VSD's scene LoRA at
the demo's lr, ``DemoConfig.lora_lr``: the best for both in bench/RESULTS.md's sweep); only the guidance differs
(APFO: its decreasing schedule, NeRF t 1.0 -> 0.2, mesh 0.5 -> 0.1; SDS / VSD: t ~ U[0.02, 0.98] in the NeRF stage,
U[0.1, 0.5] in the mesh stage). ``--variant NAME:key=value;key=value`` adds settings on top (keys ``nerf.*``,
``extract.*``, ``mesh.*`` as in the stage configs, e.g. ``nerf.guidance.spacing=sigma``), so a sweep is one call.

GPU (the ``device`` tool: worker processes share the GPU; GLB export and scoring run on their CPU cores)::

    python3 bench/glb_fidelity.py --device cuda --workers 14 --reduced --seeds 0 1 2 --budgets 50 100 200 --out $OUT

CPU (``--device cpu``): the same on this machine's cores; ``--demo`` runs exactly ``make demo``'s settings
(one budget, APFO) for every prompt, the check of issue 15's item 3.

Writes ``glb_fidelity.json`` (every run), ``glb_fidelity.md`` (the table), ``glb_fidelity.png`` (pass rate vs
wall-clock seconds per run) and ``glb_fidelity_objects.png`` (front and top view of each GLB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.jobpool import PRIOR_ENV, load_toy, run_jobs, serve  # noqa: E402

METHODS = ("apfo", "sds", "vsd")
#: t ranges per method and stage (module docstring).
T_RANGES = {"apfo": ((1.0, 0.2), (0.5, 0.1)), "sds": ((0.98, 0.02), (0.5, 0.1)), "vsd": ((0.98, 0.02), (0.5, 0.1))}


def prompt_list(reduced: bool, shapes=None):
    """(shape, colour) pairs: all 42, a reduced 7 (every shape once, colours cycling), or ``shapes`` x colours."""
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES

    if shapes:
        return [(s, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, s in enumerate(shapes)]
    if reduced:
        return [(s, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, s in enumerate(SHAPES)]
    return [(s, c) for s in SHAPES for c in COLOUR_NAMES]


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_variant(spec: str):
    """``"name:nerf.lr_grid=0.05;mesh.guidance.cfg_scale=20"`` -> (name, {key: value}); ``"name"`` alone: no change.
    A name ``"apfo/name"`` runs for that method only."""
    name, _, rest = spec.partition(":")
    changes = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or key.split(".")[0] not in ("nerf", "extract", "mesh", "method"):
            raise SystemExit(f"variant '{spec}': '{item}' is not nerf.*|extract.*|mesh.*|method.*=value")
        changes[key] = parse_value(value)
    return name, changes


def pipeline_configs(method: str, budget: int, seed: int, changes: dict):
    """(NeRFStageConfig, ExtractConfig, MeshStageConfig) of the demo with ``method``, ``budget`` and ``changes``."""
    from dreamflow import config as cfgio
    from dreamflow.demo import DemoConfig, stage_configs

    nerf, extract, mesh = stage_configs(DemoConfig(seed=seed, nerf_iterations=budget))
    (n0, n1), (m0, m1) = T_RANGES[method]
    nerf = cfgio.replace(nerf, **{"guidance.method": method, "guidance.t_start": n0, "guidance.t_end": n1})
    mesh = cfgio.replace(mesh, **{"guidance.method": method, "guidance.t_start": m0, "guidance.t_end": m1})
    per = {"nerf": {}, "extract": {}, "mesh": {}}
    for key, value in changes.items():
        head, rest = key.split(".", 1)
        if head == "method":  # method.<name>.<stage>.<key>: only for that method
            m, stage_key = rest.split(".", 1)
            if m != method:
                continue
            head, rest = stage_key.split(".", 1)
        per[head][rest] = value
    return (cfgio.replace(nerf, **per["nerf"]), cfgio.replace(extract, **per["extract"]),
            cfgio.replace(mesh, **per["mesh"]))


def run_job(denoiser, classifier, job, changes):
    """One GLB made and scored: the fidelity dict, stage timings and a 2-view preview (uint8 [64, 128, 3])."""
    from dreamflow.export import ExportConfig
    from dreamflow.export.glb import render_textured_turntable
    from dreamflow.stages import extract_mesh_state, run_mesh_stage, run_nerf_stage
    from dreamflow.toy.fidelity import glb_fidelity, load_glb
    from dreamflow.toy.world import caption

    method, variant, budget, shape, colour, seed = job
    nerf_cfg, extract_cfg, mesh_cfg = pipeline_configs(method, budget, seed, changes)
    prompt = caption(shape, colour)
    sync = torch.cuda.synchronize if denoiser.device.type == "cuda" else (lambda: None)
    t0 = time.time()
    nerf = run_nerf_stage(denoiser, prompt, "", nerf_cfg)
    sync()
    t1 = time.time()
    mesh = extract_mesh_state(nerf, extract_cfg)
    mesh = run_mesh_stage(denoiser, mesh, prompt, "", mesh_cfg)
    sync()
    t2 = time.time()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"glbfid_{os.getpid()}.glb")
    mesh.export_glb(path, ExportConfig(texture_size=256))
    t3 = time.time()
    glb = load_glb(path)
    fid = glb_fidelity(glb, shape, colour, seed=seed, classifier=classifier)
    t4 = time.time()
    front = render_textured_turntable(glb.vertices, glb.faces, glb.uvs, glb.texture, n_views=1, resolution=64,
                                      backend="torch")
    top = render_textured_turntable(glb.vertices, glb.faces, glb.uvs, glb.texture, n_views=1, resolution=64,
                                    elevation=89.0, backend="torch")
    preview = (torch.cat([front[0], top[0]], 1).clamp(0, 1) * 255).round().to(torch.uint8).tolist()
    keep = os.environ.get("GLB_FIDELITY_KEEP")
    if keep:
        os.makedirs(keep, exist_ok=True)
        os.replace(path, os.path.join(keep, "_".join(str(x).replace("/", "-") for x in job) + ".glb"))
    else:
        os.remove(path)
    return {"job": list(job), **fid.to_dict(), "nerf_s": t1 - t0, "mesh_s": t2 - t1, "export_s": t3 - t2,
            "score_s": t4 - t3, "seconds": t2 - t0, "preview": preview}


def _describe(r: dict) -> str:
    """Progress-line tail of one scored GLB."""
    from dreamflow.toy.fidelity import Fidelity, failures

    fails = failures(Fidelity.from_row(r))
    return (f"{r['seconds']:.1f} s IoU {r['iou_mean']:.2f} CD {r['chamfer']:.3f} dE {r['delta_e']:.1f} "
            f"fl {r['floaters']:.3f} " + ("PASS" if not fails else "FAIL: " + "; ".join(fails)))


def worker(jobs, results, device: str, variants, threads: int):
    den, clf = load_toy(device, threads, "cpu")
    serve(jobs, results, lambda job: run_job(den, clf, job, variants[job[1]]))


def _ms(values):
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return (float("nan"), float("nan")) if a.size == 0 else (float(a.mean()), float(a.std()))


def summarise(rows):
    """{(method, variant, budget): aggregate} over the finished runs (mean and SD over objects; pass rate per seed)."""
    from dreamflow.toy.classifier import r_precision
    from dreamflow.toy.fidelity import Fidelity, failures
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES

    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault(tuple(r["job"][:3]), []).append(r)
    table = {}
    for key, got in groups.items():
        ok = [not failures(Fidelity.from_row(r)) for r in got]
        seeds = sorted({r["job"][5] for r in got})
        per_seed = [np.mean([o for o, r in zip(ok, got) if r["job"][5] == s]) for s in seeds]
        agg = {"n": len(got), "pass": float(np.mean(ok)), "pass_sd_seeds": float(np.std(per_seed)),
               "seeds": seeds}
        for name in ("iou_mean", "iou_min", "chamfer", "delta_e", "floaters", "seconds", "nerf_s", "mesh_s"):
            agg[name], agg[name + "_sd"] = _ms(r[name] for r in got)
        agg["hole_iou"], agg["hole_iou_sd"] = _ms(r["hole_iou"] for r in got)
        agg["colour_right"] = float(np.mean([r["colour_nearest"] == r["colour"] for r in got]))
        lp = [r["class_log_probs"] for r in got if r.get("class_log_probs")]
        if lp:
            targets = [(SHAPES.index(r["shape"]), COLOUR_NAMES.index(r["colour"])) for r in got if r.get("class_log_probs")]
            agg["r_precision"] = r_precision(torch.tensor(lp), targets)["r_precision"]
        table[key] = agg
    return table


def markdown(table) -> str:
    lines = ["| method | variant | NeRF updates | n | pass | IoU mean | worst-view IoU | torus hole IoU | Chamfer | "
             "Delta E | colour right | floaters | R-prec. | s / run (NeRF + mesh stage) |",
             "|---|---|---:|---:|---|---|---|---|---|---|---:|---|---:|---|"]
    for (m, v, b), a in sorted(table.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1], kv[0][2])):
        lines.append(
            f"| {m} | {v} | {b} | {a['n']} | {a['pass']:.2f} (seed SD {a['pass_sd_seeds']:.2f}) | "
            f"{a['iou_mean']:.3f} +- {a['iou_mean_sd']:.3f} | {a['iou_min']:.3f} +- {a['iou_min_sd']:.3f} | "
            f"{a['hole_iou']:.2f} +- {a['hole_iou_sd']:.2f} | {a['chamfer']:.4f} +- {a['chamfer_sd']:.4f} | "
            f"{a['delta_e']:.1f} +- {a['delta_e_sd']:.1f} | {a['colour_right']:.2f} | "
            f"{a['floaters']:.3f} +- {a['floaters_sd']:.3f} | {a.get('r_precision', float('nan')):.2f} | "
            f"{a['seconds']:.1f} ({a['nerf_s']:.1f} + {a['mesh_s']:.1f}) |")
    return "\n".join(lines)


def plot(table, path):
    """Pass rate vs mean seconds per run, one line per (method, variant) over its budgets (PIL only)."""
    from PIL import Image, ImageDraw

    W, H, m = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xmax = max([a["seconds"] for a in table.values()] + [1.0]) * 1.05
    X = lambda s: m + (W - 2 * m) * s / xmax  # noqa: E731
    Y = lambda v: H - m - (H - 2 * m) * v  # noqa: E731
    d.line([(m, m), (m, H - m), (W - m, H - m)], fill="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([(m - 4, Y(v)), (W - m, Y(v))], fill=(225, 225, 225))
        d.text((8, Y(v) - 6), f"{v:.2f}", fill="black")
    for s in np.linspace(0, xmax, 6)[1:]:
        d.text((X(s) - 10, H - m + 8), f"{s:.0f}", fill="black")
    d.text((W // 2 - 110, H - 22), "seconds per run (NeRF + mesh stage)", fill="black")
    d.text((m, 12), "toy world: share of GLBs passing the fidelity thresholds", fill="black")
    palette = [(200, 30, 30), (30, 90, 200), (30, 150, 60), (200, 120, 0), (120, 40, 160), (0, 150, 150), (90, 90, 90)]
    lines = sorted({(k[0], k[1]) for k in table})
    for i, (mth, var) in enumerate(lines):
        pts = sorted((table[k]["seconds"], table[k]["pass"]) for k in table if k[:2] == (mth, var))
        col = palette[i % len(palette)]
        if len(pts) > 1:
            d.line([(X(s), Y(p)) for s, p in pts], fill=col, width=3)
        for s, p in pts:
            d.ellipse([X(s) - 4, Y(p) - 4, X(s) + 4, Y(p) + 4], fill=col)
        d.text((W - m - 150, m + 14 * i), f"{mth} {var}", fill=col)
    img.save(path)


def preview_grid(rows, path):
    """Front + top view of every GLB: rows (method, variant, budget, seed), columns prompts."""
    from PIL import Image

    done = [r for r in rows if "preview" in r]
    keys = sorted({(r["job"][0], r["job"][1], r["job"][2], r["job"][5]) for r in done})
    prompts = sorted({(r["job"][3], r["job"][4]) for r in done})
    if not keys:
        return
    grid = Image.new("RGB", (128 * len(prompts), 64 * len(keys)), "white")
    for r in done:
        i = keys.index((r["job"][0], r["job"][1], r["job"][2], r["job"][5]))
        j = prompts.index((r["job"][3], r["job"][4]))
        grid.paste(Image.fromarray(np.asarray(r["preview"], dtype=np.uint8)), (128 * j, 64 * i))
    grid.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME[:key=value;...] settings on top of the demo's (repeatable; default: one 'default')")
    p.add_argument("--common", default="", help="key=value;... applied to every variant (same keys as --variant)")
    p.add_argument("--budgets", nargs="+", type=int, default=[100, 200])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--reduced", action="store_true", help="7 prompts (every shape once) instead of all 42")
    p.add_argument("--shapes", nargs="+", default=None, help="only these shapes (one colour each, cycling)")
    p.add_argument("--demo", action="store_true",
                   help="make demo's settings: APFO, DemoConfig's budget (--variant changes apply on top)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--deadline-s", type=float, default=1e9, help="stop collecting after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/glb_fidelity_out"))
    p.add_argument("--keep-glb", default=None, help="keep every GLB in this folder (default: deleted once scored)")
    p.add_argument("--prior", default=None, help="toy prior folder to use instead of models/dreamflow-toy")
    args = p.parse_args(argv)
    if args.prior:
        if not os.path.isfile(os.path.join(args.prior, "model_index.json")):
            raise SystemExit(f"--prior {args.prior}: no model_index.json there; give a toy prior folder")
        os.environ[PRIOR_ENV] = os.path.abspath(args.prior)
    if args.keep_glb:
        os.environ["GLB_FIDELITY_KEEP"] = os.path.abspath(args.keep_glb)
    if args.demo:
        from dreamflow.demo import DemoConfig

        args.methods, args.budgets = ["apfo"], [DemoConfig().nerf_iterations]
        args.variant = args.variant or ["demo"]  # make demo's settings, plus each --variant's changes if given
    variants = dict(parse_variant(v) for v in (args.variant or ["default"]))
    common = parse_variant("common:" + args.common)[1]
    variants = {name: {**common, **changes} for name, changes in variants.items()}
    prompts = prompt_list(args.reduced, args.shapes)
    # Cheap jobs first, everything else interleaved, so a deadline cuts the largest budget evenly.
    jobs_list = [(m, v, b, s, c, seed) for b in sorted(args.budgets) for seed in args.seeds for (s, c) in prompts
                 for v in variants for m in args.methods if "/" not in v or v.split("/")[0] == m]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows = run_jobs(jobs_list, worker, (args.device, variants, args.threads), args.workers, args.deadline_s, _describe)
    table = summarise(rows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"settings": vars(args), "variants": variants, "device": device_name, "prompts": prompts,
           "wall_s": time.time() - t0, "table": {"|".join(map(str, k)): v for k, v in table.items()},
           "runs": [{k: v for k, v in r.items() if k != "preview"} for r in rows]}
    with open(os.path.join(args.out, "glb_fidelity.json"), "w") as f:
        json.dump(out, f)
    md = markdown(table)
    with open(os.path.join(args.out, "glb_fidelity.md"), "w") as f:
        f.write(md + "\n")
    if table:
        plot(table, os.path.join(args.out, "glb_fidelity.png"))
    preview_grid(rows, os.path.join(args.out, "glb_fidelity_objects.png"))
    print(f"\nGLB fidelity ({device_name}, {len(rows)}/{len(jobs_list)} runs, {time.time() - t0:.0f} s)\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
