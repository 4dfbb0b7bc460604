"""The 12 GB mode on the device (issue 17 item 2): peak GPU memory and ms per update of every stage of the paper
pipeline under LoadDenoiser's memory presets, "default" and "low_vram" (``dreamflow/denoisers/memory.py``).

The real stage code (``run_nerf_stage`` / ``run_mesh_stage`` / ``run_refine_stage``, the stages' default configs:
APFO with CFG 7.5 and the camera-conditioned scene LoRA) runs a few updates per stage and preset, driven by
random-weight networks of the exact released architectures (``bench_gpu.random_denoiser``: SD 2.1-base for stages
1-2 as the paper workflow loads it, 256 px renders encoded at 512 px = 64 x 64 latents, 512 px in stage 2; the SDXL
refiner for stage 3, 1024 px = 128 x 128 latents; float16 UNets). Memory does not depend on the weights.

Per (stage, preset), one row: views per update as the preset runs them (low_vram fits them to its
``max_view_pixels``, with proportionally more updates), peak ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` from the stage's start (weights resident) to its end, graph captures included,
the piece of the update in which the peak fell, median ms per update after ``--warmup`` updates and per view, and
pass / fail against ``--target-gib`` (11.5) on the reserved peak. low_vram runs under a cap
(``torch.cuda.set_per_process_memory_fraction``, ``--cap-gib``, default the target): the allocator then behaves as
on a card with only that much memory (it frees its cache and retries before failing), so a pass means the run fits;
an out-of-memory is a row with status "oom". Each row is guarded: an error is reported in the table and the other
rows still run; the table is printed and the JSON written (after every row) whatever happens.

Not counted by the allocator: the CUDA context and kernels (a few hundred MiB, the margin between 11.5 GiB and a
12 GB card). Defaults: ``--fast-path graphs`` (CUDA graphs, fused LoRA AdamW, no torch.compile: a cold compile
alone takes minutes, bench/RESULTS.md run 6), hash grid uncompiled, nvdiffrast when installed.

    bash bench/on_device.sh python3 bench/bench_lowvram.py --out "$OUT"   # GPU: table + $OUT/bench_lowvram.json
    python bench/bench_lowvram.py --smoke --out /tmp/lowvram.json          # CPU, tiny models, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import faulthandler
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu import (call_stage, card_name, free, gib, patched_pieces, random_denoiser, sphere_state,  # noqa: E402
                       stage_configs, sync, tiny_denoiser)

#: The issue's budget: every stage at or under this peak (GiB) on the device.
TARGET_GIB = 11.5
#: stage -> the denoiser kind it runs with.
STAGE_KIND = {"nerf": "sd", "mesh": "sd", "refine": "sdxl_refiner"}
#: Smoke mode's low_vram limit on views x px^2: the smoke NeRF / mesh stages' 2 views at 16 px become 1 and the
#: refine stage's 2 views at 32 px become 1, as 4 x 512 px become 2 and 2 x 1024 px become 1 at full size.
SMOKE_VIEW_PIXELS = 16 ** 2
SMOKE_REFINE_PX = 32
#: Row fields, in table order (the CPU test reads them).
FIELDS = ("stage", "preset", "status", "views_per_update", "updates_factor", "peak_allocated_gib", "peak_reserved_gib",
          "peak_phase", "ms_per_update", "ms_per_view", "first_update_s", "passed")


# --------------------------------------------------------------------------------------------
# Peak memory per piece of an update
# --------------------------------------------------------------------------------------------
class PeakTracker:
    """Peak GPU memory over a run and per piece of an update (``bench_gpu.patched_pieces``' pieces; the
    loop's scene backward, optimiser steps and the rest between pieces count as "backward + rest").

    The allocator's statistics are host-side bookkeeping, so tracking costs no sync: the peak since the last mark is
    read and reset at every piece boundary, and the run's peak is the largest of them. Nested pieces count for
    the outermost; the APFO call is not a piece of its own (its CFG call and LoRA forward are)."""

    REST = "backward + rest"

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.phases: Dict[str, float] = {}
        self.allocated = self.reserved = 0
        self._depth = 0

    def mark(self, phase: str) -> None:
        """Attribute the peak since the last mark to ``phase`` and start a new interval."""
        if not self.cuda:
            return
        a, r = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        self.allocated, self.reserved = max(self.allocated, a), max(self.reserved, r)
        self.phases[phase] = max(self.phases.get(phase, 0), a)
        torch.cuda.reset_peak_memory_stats(self.device)

    def wrap(self, name: str, fn: Callable) -> Callable:
        if name == "guidance":
            return fn

        def tracked(*args, **kwargs):
            self._depth += 1
            if self._depth == 1:
                self.mark(self.REST)
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.mark(name)
        return tracked

    def summary(self) -> Dict[str, object]:
        if not self.cuda:
            return {"peak_allocated_gib": float("nan"), "peak_reserved_gib": float("nan"), "peak_phase": "n/a",
                    "phases_gib": {}}
        return {"peak_allocated_gib": gib(self.allocated), "peak_reserved_gib": gib(self.reserved),
                "peak_phase": max(self.phases, key=self.phases.get) if self.phases else "n/a",
                "phases_gib": {k: gib(v) for k, v in self.phases.items()}}


# --------------------------------------------------------------------------------------------
# One stage under one preset
# --------------------------------------------------------------------------------------------
def smoke_memory(preset: str):
    """The preset as smoke mode runs it: low_vram's levers with :data:`SMOKE_VIEW_PIXELS`."""
    from dreamflow.denoisers.memory import memory_config

    config = memory_config(preset)
    if config.max_view_pixels:
        config = dataclasses.replace(config, max_view_pixels=SMOKE_VIEW_PIXELS)
    return config


def stage_config(stage: str, denoiser, device: torch.device, smoke: bool, warmup: int, iters: int):
    """The stage's default config (bench_gpu's, tiny in smoke mode), fitted to the denoiser's preset
    (``fit_views``) and then cut to ``warmup + iters`` updates: each preset times the same number of updates."""
    from dreamflow.stages.common import fit_views

    variant = {"nvdiffrast": device.type == "cuda"}
    cfg = stage_configs(stage, variant, smoke, warmup + iters)
    if smoke and stage == "refine":
        cfg = dataclasses.replace(cfg, denoise_resolution=SMOKE_REFINE_PX)
    fitted = fit_views(cfg, denoiser, stage)
    return dataclasses.replace(fitted, iterations=warmup + iters), fitted.iterations // cfg.iterations


def run_stage(stage: str, d, device: torch.device, smoke: bool, warmup: int, iters: int,
              stall_s: float = 0.0) -> Dict[str, object]:
    """``warmup + iters`` updates of the real stage; per-update wall times (host clock after a sync at each
    update's progress call), peaks (:class:`PeakTracker`)."""
    from dreamflow.hosting import Callbacks

    cfg, factor = stage_config(stage, d, device, smoke, warmup, iters)
    mesh = sphere_state(device, smoke, compile_grid=False) if stage != "nerf" else None
    stamps: List[float] = []

    def progress(step, _total, _preview):
        if stall_s > 0:  # a hung update stops the process with every thread's stack; rows so far are saved
            faulthandler.dump_traceback_later(stall_s, exit=True)
        sync(device)
        stamps.append(time.perf_counter())

    callbacks = Callbacks(progress=progress, should_stop=lambda: False, preview_every=0)
    tracker = PeakTracker(device)
    free(device)
    if device.type == "cuda":  # from here: the weights and the mesh state are resident, the stage starts
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        with patched_pieces(d, tracker.wrap):
            state = call_stage(stage, d, mesh, cfg, callbacks)
    finally:
        faulthandler.cancel_dump_traceback_later()
        tracker.mark(tracker.REST)
    seconds = [b - a for a, b in zip([t0] + stamps, stamps)]
    ms = statistics.median(seconds[warmup:]) * 1e3
    out = {"views_per_update": cfg.views_per_update, "updates_factor": factor, "resolution": cfg.resolution,
           "denoise_resolution": cfg.denoise_resolution, "ms_per_update": ms, "ms_per_view": ms / cfg.views_per_update,
           "first_update_s": seconds[0], "timed_updates": len(seconds) - warmup,
           "finite_losses": all(math.isfinite(r["loss"]) for r in state.guidance_log), **tracker.summary()}
    del state, mesh
    free(device)
    return out


def status_of(error: BaseException) -> str:
    from dreamflow.errors import is_out_of_memory

    text = str(error).lower()
    return "oom" if is_out_of_memory(error) or ("out of" in text and "memory" in text) else "error"


def passed(row: Dict[str, object], target_gib: float) -> Optional[bool]:
    """Ran, and the reserved peak within the target; None when there is no GPU figure (CPU smoke)."""
    if row["status"] != "ok":
        return False if row["status"] in ("oom", "error") else None
    peak = row.get("peak_reserved_gib", float("nan"))
    return None if not math.isfinite(peak) else bool(peak <= target_gib)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def table(res: Dict[str, object]) -> str:
    """The short table: one line per (stage, preset)."""
    def num(v, fmt):
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    lines = [f"== {res['card']} | torch {res['torch']} | fast_path {res['fast_path']} | target {res['target_gib']} GiB "
             f"(reserved; low_vram capped at {res['cap_gib'] or 'no cap'}) | allocator {res.get('allocator', '-')}",
             f"{'stage':<7} {'preset':<9} {'views':>5} {'x upd':>5} {'alloc GiB':>9} {'resv GiB':>9} {'ms/upd':>8} "
             f"{'ms/view':>8} {'peak in':<16} result"]
    for r in res["rows"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r.get("passed")]
        if r["status"] != "ok":
            verdict += f" ({r['status']}: {str(r.get('error', ''))[:70]})"
        lines.append(f"{r['stage']:<7} {r['preset']:<9} {num(r.get('views_per_update'), '{:d}'):>5} "
                     f"{num(r.get('updates_factor'), '{:d}'):>5} {num(r.get('peak_allocated_gib'), '{:.2f}'):>9} "
                     f"{num(r.get('peak_reserved_gib'), '{:.2f}'):>9} {num(r.get('ms_per_update'), '{:.1f}'):>8} "
                     f"{num(r.get('ms_per_view'), '{:.1f}'):>8} {str(r.get('peak_phase', '-')):<16} {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    from dreamflow.denoisers.memory import MEMORY_PRESETS
    from dreamflow.denoisers.settings import FAST_PATHS, apply_fast_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU + tiny models: check the script end to end")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out",
                    help="folder for bench_lowvram.json, or a path ending in .json (default $OUT or ./out)")
    ap.add_argument("--stages", nargs="+", default=list(STAGE_KIND), choices=list(STAGE_KIND))
    ap.add_argument("--presets", nargs="+", default=list(MEMORY_PRESETS), choices=list(MEMORY_PRESETS))
    ap.add_argument("--warmup", type=int, default=None, help="untimed updates first (default 2; smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed updates (default 5; smoke 2)")
    ap.add_argument("--fast-path", default="graphs", choices=list(FAST_PATHS),
                    help="LoadDenoiser fast_path of every run (default graphs: no cold compile)")
    ap.add_argument("--sd", default="sd21-base", choices=["sd21-base", "sd21"],
                    help="architecture of stages 1-2 (default sd21-base, as the paper workflow; sd21 = the 768-v UNet)")
    ap.add_argument("--target-gib", type=float, default=TARGET_GIB, help="pass / fail threshold on the reserved peak")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="run non-default presets with the allocator capped at this (default: the target; 0 = no cap)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="skip the rows left after this many seconds")
    ap.add_argument("--stall-s", type=float, default=120.0,
                    help="stop with every thread's stack when one update takes longer than this (0 = off)")
    args = ap.parse_args(argv)

    smoke = args.smoke
    if smoke:  # tiny models are launch-bound: more threads only wait on each other (tests/conftest.py)
        torch.set_num_threads(1)
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    iters = args.iters if args.iters is not None else (2 if smoke else 5)
    cap = args.target_gib if args.cap_gib is None else args.cap_gib
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, "bench_lowvram.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t_start = time.perf_counter()
    res: Dict[str, object] = {
        "card": card_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "bench/bench_lowvram.py"] + (argv or sys.argv[1:])),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke, "fast_path": args.fast_path,
        "sd": args.sd, "warmup": warmup, "iters": iters, "target_gib": args.target_gib,
        "cap_gib": cap if device.type == "cuda" and cap > 0 else None, "rows": [], "errors": [],
        "allocator": (f"{torch.cuda.get_allocator_backend()} "
                      f"(PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r})"
                      if device.type == "cuda" else "cpu")}

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    tmp = tempfile.mkdtemp(prefix="dreamflow_lowvram_")
    total_gib = gib(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else 0.0

    def set_cap(preset: str) -> None:
        if device.type == "cuda":
            capped = preset != "default" and cap > 0
            index = device.index if device.index is not None else torch.cuda.current_device()  # needs an index
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_gib) if capped else 1.0, index)

    def build(kind: str, preset: str):
        if smoke:
            return tiny_denoiser(kind, os.path.join(tmp, f"{kind}-{preset}"), device, memory=smoke_memory(preset))
        return apply_fast_path(random_denoiser(args.sd if kind == "sd" else "sdxl-refiner", device, dtype,
                                               memory=preset), args.fast_path)

    print(f"card: {res['card']}  torch {torch.__version__}  fast_path {args.fast_path}", flush=True)
    try:
        for preset in args.presets:
            for kind in ("sd", "sdxl_refiner"):
                stages = [s for s in args.stages if STAGE_KIND[s] == kind]
                if not stages:
                    continue
                rows = [{"stage": s, "preset": preset, "status": "skipped"} for s in stages]
                res["rows"] += rows
                if time.perf_counter() - t_start > args.budget_s:
                    print(f"[skip] {preset} {kind}: over --budget-s", flush=True)
                    continue
                d = None
                try:
                    free(device)
                    d = build(kind, preset)  # uncapped: random_denoiser initialises in float32 before the cast
                    free(device)
                    set_cap(preset)
                    weights = gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else float("nan")
                    for row in rows:
                        row["weights_gib"] = weights
                        if time.perf_counter() - t_start > args.budget_s:
                            print(f"[skip] {row['stage']} {preset}: over --budget-s", flush=True)
                            continue
                        t0 = time.perf_counter()
                        try:
                            row.update(run_stage(row["stage"], d, device, smoke, warmup, iters,
                                                 0.0 if smoke else args.stall_s), status="ok")
                        except Exception as e:  # one stage's failure is a row; the others still run
                            row.update(status=status_of(e), error=f"{type(e).__name__}: {str(e)[:300]}")
                            traceback.print_exc()
                        row["passed"] = passed(row, args.target_gib)
                        print(f"[{row['status']}] {row['stage']} {preset} in {time.perf_counter() - t0:.1f} s: "
                              f"{json.dumps({k: row.get(k) for k in FIELDS[3:]}, default=str)}", flush=True)
                        save()
                except Exception as e:  # the denoiser did not build: every row of it says why
                    for row in rows:
                        if row["status"] == "skipped":
                            row.update(status=status_of(e), error=f"build: {type(e).__name__}: {str(e)[:300]}",
                                       passed=False)
                    res["errors"].append(f"build {kind} {preset}: {type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc()
                finally:
                    if d is not None:
                        d.unload()
                    del d
                    free(device)
                    set_cap("default")
                    save()
    finally:
        for row in res["rows"]:
            row.setdefault("passed", passed(row, args.target_gib))
        res["wall_s"] = time.perf_counter() - t_start
        save()
        print("\n" + table(res))
        print(f"\nwrote {path} ({res['wall_s']:.0f} s)", flush=True)
    return res


if __name__ == "__main__":
    main()
