"""bench/bench_lowvram.py on the CPU: the smoke path end to end (every stage under both presets, the table and the
JSON), a failing row that does not stop the others, and the per-piece peak attribution (a fake allocator)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    import bench_lowvram

    return bench_lowvram


def test_smoke_runs_every_stage_under_both_presets(bench, tmp_path, capsys):
    out = tmp_path / "lowvram.json"
    res = bench.main(["--smoke", "--out", str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(res["rows"], default=str))
    rows = {(r["stage"], r["preset"]): r for r in res["rows"]}
    assert list(rows) == [("nerf", "default"), ("mesh", "default"), ("refine", "default"),
                          ("nerf", "low_vram"), ("mesh", "low_vram"), ("refine", "low_vram")]
    for r in rows.values():
        assert set(bench.FIELDS) <= set(r), sorted(set(bench.FIELDS) - set(r))
        assert r["status"] == "ok" and r["finite_losses"] and r["timed_updates"] == 2
        assert r["ms_per_update"] > 0 and r["ms_per_view"] == pytest.approx(r["ms_per_update"] / r["views_per_update"])
        assert r["passed"] is None and math.isnan(r["peak_reserved_gib"])  # no GPU figure on the CPU
    # low_vram fits the views: every stage's 2 views exceed the smoke limit (as 4 x 512 px and 2 x 1024 px exceed
    # low_vram's at full size): 1 view and twice the updates
    for stage in ("nerf", "mesh", "refine"):
        assert (rows[stage, "low_vram"]["views_per_update"], rows[stage, "low_vram"]["updates_factor"]) == (1, 2)
        assert (rows[stage, "default"]["views_per_update"], rows[stage, "default"]["updates_factor"]) == (2, 1)
    table = capsys.readouterr().out.split("\n== cpu")[1]
    lines = [line.split() for line in table.splitlines()[2:] if line.strip()]
    assert [(cells[0], cells[1], cells[2]) for cells in lines[:6]] == [
        ("nerf", "default", "2"), ("mesh", "default", "2"), ("refine", "default", "2"),
        ("nerf", "low_vram", "1"), ("mesh", "low_vram", "1"), ("refine", "low_vram", "1")]
    assert all(cells[9] == "n/a" for cells in lines[:6])


def test_a_failing_row_is_reported_and_the_others_run(bench, tmp_path, monkeypatch, capsys):
    """An out-of-memory in one stage and an error in another are rows of their own; the rest is measured, and the
    table and the JSON hold every row."""
    def fake_run(stage, d, device, smoke, warmup, iters, stall_s=0.0):
        if stage == "mesh":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if stage == "refine":
            raise RuntimeError("boom")
        return {"views_per_update": 4, "updates_factor": 1, "ms_per_update": 10.0, "ms_per_view": 2.5,
                "peak_allocated_gib": 9.0, "peak_reserved_gib": 10.0, "peak_phase": "lora step",
                "first_update_s": 1.0}

    monkeypatch.setattr(bench, "run_stage", fake_run)
    res = bench.main(["--smoke", "--presets", "low_vram", "--out", str(tmp_path)])
    rows = {r["stage"]: r for r in res["rows"]}
    assert (rows["nerf"]["status"], rows["nerf"]["passed"]) == ("ok", True)
    assert (rows["mesh"]["status"], rows["mesh"]["passed"]) == ("oom", False) and "out of memory" in rows["mesh"]["error"]
    assert (rows["refine"]["status"], rows["refine"]["passed"]) == ("error", False) and "boom" in rows["refine"]["error"]
    with open(tmp_path / "bench_lowvram.json") as f:
        assert [r["status"] for r in json.load(f)["rows"]] == ["ok", "oom", "error"]
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL (oom: OutOfMemoryError" in out and "FAIL (error: RuntimeError: boom" in out
    row = dict(rows["nerf"], peak_reserved_gib=12.0)
    assert bench.passed(row, 11.5) is False and bench.passed(dict(row, status="skipped"), 11.5) is None


def test_peaks_are_attributed_to_the_piece_they_fall_in(bench, monkeypatch):
    """With a fake allocator: each piece gets the peak reached inside it, the gaps go to "backward + rest",
    nested pieces count for the outermost, the APFO call is not a piece, and the run's peak is the largest."""
    state = {"now": 0, "peak": 0, "reserved": 0}

    def alloc(n):
        state["now"] += n
        state["peak"] = max(state["peak"], state["now"])
        state["reserved"] = max(state["reserved"], state["now"] + 1)

    def reset(_device=None):
        state["peak"] = state["reserved"] = state["now"]

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda _d=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda _d=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    tracker = bench.PeakTracker(torch.device("cuda"))
    gi = 2 ** 30

    def piece(n, inner=None):
        def fn():
            alloc(n * gi)
            if inner is not None:
                inner()
            alloc(-n * gi)
        return fn

    encode = tracker.wrap("vae encode", piece(3))
    cfg = tracker.wrap("cfg unet", piece(1))
    lora = tracker.wrap("lora step", piece(2, inner=cfg))  # a nested piece counts for the outer one
    guidance = tracker.wrap("guidance", lambda: (cfg(), lora()))
    assert tracker.wrap("guidance", print) is print
    alloc(4 * gi)  # weights
    reset()
    encode()
    alloc(5 * gi)  # the scene's activations until the backward
    guidance()
    alloc(-5 * gi)
    tracker.mark(tracker.REST)
    summary = tracker.summary()
    assert summary["phases_gib"] == {"backward + rest": 9.0, "vae encode": 7.0, "cfg unet": 10.0, "lora step": 12.0}
    assert summary["peak_phase"] == "lora step" and summary["peak_allocated_gib"] == 12.0
    assert summary["peak_reserved_gib"] == pytest.approx(12.0 + 1 / gi)
