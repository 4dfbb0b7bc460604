"""``python -m dreamflow batch``: jobs per (prompt, seed) on local Ray and on the plain-process fallback, a job that
fails (retried once, recorded, the batch goes on), a resume that skips done jobs and re-runs partial / failed ones,
Ctrl-C, and the output folder's rules (only a renamed job folder with job.json is done)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dreamflow.demo import DEMO_WORKFLOW
from dreamflow.errors import DreamFlowError
from dreamflow.runner import batch
from dreamflow.runner.batch import OutputFolder, job_id, job_sets, plan_jobs, read_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_WORKFLOW = DEMO_WORKFLOW
OUTSIDE = "a purple dragon"  # not in the toy world: the job fails, twice
PROMPTS = ["a red torus", "a green cone", OUTSIDE, "a blue sphere"]
#: Tiny settings: a job is seconds of work once its process has imported the engine.
TINY = {"DreamFlowLoadDenoiser.device": "cpu", "DreamFlowNeRFStage.iterations": 2, "DreamFlowNeRFStage.resolution": 16,
        "DreamFlowNeRFStage.views_per_update": 1, "DreamFlowNeRFStage.n_samples": 8,
        "DreamFlowNeRFStage.n_importance": 8, "DreamFlowNeRFStage.preview_views": 2,
        "DreamFlowNeRFStage.preview_resolution": 16, "DreamFlowExtractMesh.resolution": 24,
        "DreamFlowExtractMesh.preview_views": 2, "DreamFlowExtractMesh.preview_resolution": 16,
        "DreamFlowMeshStage.iterations": 2, "DreamFlowMeshStage.resolution": 16,
        "DreamFlowMeshStage.views_per_update": 1, "DreamFlowMeshStage.preview_views": 2,
        "DreamFlowMeshStage.preview_resolution": 16, "DreamFlowSaveGLB.texture_size": 64,
        "DreamFlowSaveGLB.turntable_views": 2, "DreamFlowSaveGLB.turntable_resolution": 32}


def cli(prompts, out, *extra, sets=TINY, timeout=280):
    args = [sys.executable, "-m", "dreamflow", "batch", str(prompts), "--workflow", TOY_WORKFLOW, "--output", str(out),
            *extra, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"})


def manifest(out):
    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------
def test_prompts_file_and_job_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# props\n a red  torus \n\na green cone\na red torus\n")
    assert read_prompts(str(path)) == ["a red torus", "a green cone"]
    jobs = plan_jobs(["a red torus", "A red torus!"], seeds=2, first_seed=5)
    assert [(j.prompt, j.seed) for j in jobs] == [("a red torus", 5), ("a red torus", 6), ("A red torus!", 5),
                                                  ("A red torus!", 6)]
    assert len({j.id for j in jobs}) == 4  # same words, other prompt: another folder
    assert jobs[0].id == job_id("a red torus", 5) and jobs[0].id.startswith("a-red-torus-") and jobs[0].id.endswith("-s5")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for name, message in (("empty.txt", "holds no prompt"), ("missing.txt", "does not exist")):
        with pytest.raises(DreamFlowError, match=message):
            read_prompts(str(tmp_path / name))


def test_job_sets_reach_every_stage_prompt_and_seed():
    from dreamflow.runner.cli import prepare
    from dreamflow.runner.validate import apply_sets

    api, _, defs = prepare(TOY_WORKFLOW, [], log=lambda line: None)
    sets = job_sets(api, defs, "a blue cone, side view", 7)
    apply_sets(api, sets, defs)
    stages = [e for e in api.values() if e["class_type"] in ("DreamFlowNeRFStage", "DreamFlowMeshStage")]
    assert stages and all(e["inputs"]["seed"] == 7 for e in stages)
    with_prompt = [e for e in api.values() if "prompt" in e["inputs"]]
    assert with_prompt and all(e["inputs"]["prompt"] == "a blue cone, side view" for e in with_prompt)


def test_output_folder_counts_only_finished_jobs(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(str(out))
    rec = {"job": "a-1", "prompt": "p", "seed": 0, "status": "ok", "glb": "x/m.glb", "turntable": None}
    written = folder.commit(dict(rec), {"x/m.glb": b"glb"}, "log")
    assert written["glb"] == "a-1/x/m.glb" and (out / "a-1" / "x" / "m.glb").read_bytes() == b"glb"
    os.makedirs(out / "b-2")  # a folder without job.json: never done
    os.makedirs(out / ".tmp-c-3")  # a killed driver's temp folder: removed by the next call
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"job": "torn')  # a torn last line
    folder = OutputFolder(str(out))
    assert set(folder.done()) == {"a-1"} and not (out / ".tmp-c-3").exists()
    assert [r["job"] for r in folder.manifest_records()] == ["a-1"]
    os.remove(out / "manifest.jsonl")  # killed between rename and manifest line: the line is written again
    folder.reconcile(folder.done())
    assert [r["job"] for r in folder.manifest_records()] == ["a-1"]
    folder.fail({"job": "b-2", "status": "failed", "error": "boom"}, "trace")
    assert (out / "failed" / "b-2.log").read_text() == "trace" and set(folder.done()) == {"a-1"}
    folder.check_workflow({"workflow": "w", "sha256": "1"})
    folder.check_workflow({"workflow": "w", "sha256": "1"})
    with pytest.raises(DreamFlowError, match="holds jobs of another workflow"):
        folder.check_workflow({"workflow": "w2", "sha256": "2"})


def test_bad_batches_are_one_line_errors(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red torus\n")
    draft = os.path.join(REPO, "workflows", "DreamFlow quick draft.json")
    for args, message in ((("--seeds", "0"), "--seeds 0"),
                          (("--backend", "process", "--gpus-per-job", "1"), "has no CUDA GPU"),
                          (("--set", "DreamFlowNeRFStage.iterations=0"), "below its minimum")):
        res = cli(prompts, tmp_path / "out", *args, sets={}, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.startswith("dreamflow: error: ") and res.stderr.count("\n") == 1 and message in res.stderr
    res = subprocess.run([sys.executable, "-m", "dreamflow", "batch", str(prompts), "--workflow", draft, "--output",
                          str(tmp_path / "out"), "--backend", "process"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    # the --gpus-per-job call above stopped after writing the toy workflow's batch.json: another workflow is refused
    assert res.returncode == 2 and "holds jobs of another workflow" in res.stderr


# ----------------------------------------------------------------------------------------------
# End to end: 4 toy prompts, one outside the toy world, 2 workers; then a resume
# ----------------------------------------------------------------------------------------------
def check_first_run(res, out):
    import trimesh
    from PIL import Image

    assert res.returncode == batch.EXIT_SOME_FAILED, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 jobs (4 prompts x 1 seeds), 0 done before, 4 to run" in res.stdout
    assert "2 at once" in res.stdout and "[4/4]" in res.stdout and "3 ok, 1 failed" in res.stdout
    assert re.search(r"3 ok, 1 failed, 0 done before; [0-9.]+ min, [0-9.]+ jobs / hour", res.stdout)
    rows = manifest(out)
    assert sorted((r["prompt"], r["status"], r["attempts"]) for r in rows) == sorted(
        (p, "failed" if p == OUTSIDE else "ok", 2 if p == OUTSIDE else 1) for p in PROMPTS)
    failed = next(r for r in rows if r["status"] == "failed")
    assert "outside the toy world" in failed["error"] and "\n" not in failed["error"]
    assert len(failed["earlier_errors"]) == 1 and (out / "failed" / f"{failed['job']}.log").is_file()
    assert not (out / failed["job"]).exists()
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["job"] == job_id(r["prompt"], 0) and r["seed"] == 0 and r["error"] is None
        assert r["settings"]["3:DreamFlowNeRFStage"]["prompt"] == r["prompt"]
        assert r["settings"]["3:DreamFlowNeRFStage"]["iterations"] == 2
        assert r["timings"]["total_s"] > 0 and set(r["timings"]["nodes_s"]) >= {"3:DreamFlowNeRFStage",
                                                                                 "9:DreamFlowSaveGLB"}
        assert r["peak_memory"]["rss_mib"] > 50
        with open(out / r["job"] / "job.json") as f:
            assert json.load(f) == r  # the folder's record is the manifest's line
        (geom,) = trimesh.load(out / r["glb"]).geometry.values()
        assert len(geom.faces) > 20 and geom.visual.material.baseColorTexture.size == (64, 64)
        assert Image.open(out / r["turntable"]).size[1] == 32
        log = (out / r["job"] / "log.txt").read_text()
        assert "(DreamFlowNeRFStage)" in log and "it/s" not in log  # the runner's lines, no progress bars
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    return rows


def check_resume(res, out, rows, rerun):
    """A second call: done jobs skipped (their files untouched), ``rerun`` jobs run again."""
    assert f"{4 - len(rerun)} done before, {len(rerun)} to run" in res.stdout, res.stdout[-3000:]
    new = manifest(out)[len(rows):]
    assert sorted(r["job"] for r in new) == sorted(rerun)
    return new


@pytest.mark.e2e
@pytest.mark.timeout(600)  # two batch calls: minutes on a busy 2-core machine
def test_batch_on_local_ray_fails_one_job_and_resumes(tmp_path):
    pytest.importorskip("ray")
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    res = cli(prompts, out, "--workers", "2")
    assert "on local Ray" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    rows = check_first_run(res, out)
    # a partial job (its folder without job.json, as a copy interrupted by hand) is not done
    partial = job_id("a green cone", 0)
    os.remove(out / partial / "job.json")
    kept = job_id("a red torus", 0)
    stamp = os.path.getmtime(out / kept / "job.json")
    failed = job_id(OUTSIDE, 0)
    res = cli(prompts, out, "--workers", "2")
    assert res.returncode == batch.EXIT_SOME_FAILED, res.stdout[-3000:] + res.stderr[-3000:]
    new = check_resume(res, out, rows, [partial, failed])
    assert {r["job"]: (r["status"], r["attempts"]) for r in new} == {partial: ("ok", 1), failed: ("failed", 2)}
    assert os.path.getmtime(out / kept / "job.json") == stamp
    assert (out / partial / "job.json").is_file()


@pytest.mark.e2e
@pytest.mark.timeout(600)  # two batch calls: minutes on a busy 2-core machine
def test_batch_without_ray_uses_processes_and_resumes(tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    res = cli(prompts, out, "--workers", "2", "--backend", "process")
    assert "on local processes" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    rows = check_first_run(res, out)
    stamps = {r["job"]: os.path.getmtime(out / r["job"] / "job.json") for r in rows if r["status"] == "ok"}
    res = cli(prompts, out, "--workers", "2", "--backend", "process")
    assert res.returncode == batch.EXIT_SOME_FAILED, res.stdout[-3000:] + res.stderr[-3000:]
    (again,) = check_resume(res, out, rows, [job_id(OUTSIDE, 0)])
    assert again["status"] == "failed" and again["attempts"] == 2
    assert {j: os.path.getmtime(out / j / "job.json") for j in stamps} == stamps


@pytest.mark.e2e
def test_ctrl_c_stops_the_batch_and_leaves_nothing_half_written(tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red torus\na green cone\n")
    args = [sys.executable, "-m", "dreamflow", "batch", str(prompts), "--workflow", TOY_WORKFLOW, "--output", str(out),
            "--backend", "process", "--workers", "1",
            *(a for k, v in {**TINY, "DreamFlowNeRFStage.iterations": 100000}.items() for a in ("--set", f"{k}={v}"))]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"})
    seen = ""
    deadline = time.time() + 200
    while "batch: on" not in seen and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "batch: on" in seen, seen[-2000:]
    time.sleep(3)  # the first job is running
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (seen + rest)[-2000:]
    assert "interrupted: 0 done, 0 failed, 2 not run" in rest
    assert sorted(os.listdir(out)) == ["batch.json"]  # no job folder, no temp folder, no manifest line
