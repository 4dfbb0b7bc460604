"""``python -m dreamflow batch PROMPTS.txt --workflow W.json --output DIR [--seeds N] [--ray ADDRESS]``.

Many prompts, many seeds, many GPUs: one job per (prompt, seed), each the workflow run through the headless
runner (``--set`` of every node's ``prompt`` and ``seed`` input), scheduled as a Ray task (``pip install
comfyui-dreamflow[batch]``; local Ray by default, a running cluster with ``--ray ADDRESS``) or, without Ray, in
plain spawned processes (one per job, at most ``--workers`` at once).

The output folder::

    DIR/batch.json          the workflow (API prompt after the user's --set) every job of DIR runs
    DIR/manifest.jsonl      one JSON line per finished job: prompt, seed, status, error, files, settings,
                            timings, peak memory, attempts
    DIR/<job>/              a done job: its GLB, turntable PNG, job.json (its manifest record), log.txt
    DIR/failed/<job>.log    the log of a job that failed twice

Only the driver writes to DIR, and a job's folder appears by one ``rename`` of a finished temporary folder: a job is
done exactly when ``DIR/<job>/job.json`` exists. A second call skips done jobs and runs the rest (failed ones
again). A failed job is retried once, then recorded with its one-line error, and the batch goes on. Ctrl-C
stops the running jobs, keeps the finished ones and leaves no partial folder. Jobs return their files' bytes
to the driver, so a Ray cluster needs no shared file system.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple

from ..errors import DreamFlowError

EXIT_SOME_FAILED = 3
#: Attempts per job (the first run and one retry).
ATTEMPTS = 2
#: The node pack's folder: shipped to a Ray cluster's workers as their working directory.
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: What a cluster's workers do not need from the pack's folder.
SHIP_EXCLUDES = [".git", ".venv", ".tools", ".whl", ".gl", ".device", "out", "output", "tests", "bench",
                 "__pycache__", "*.pyc", ".pytest_cache", ".bench-smoke"]
TOY_MODEL = "dreamflow-toy"
#: Environment of every job's process: no progress bars in a job's log (the batch prints its own lines; tqdm
#: reads the variable when first imported, and Ray's workers import it before any job).
JOB_ENV = {"TQDM_DISABLE": "1"}


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    id: str
    prompt: str
    seed: int


def read_prompts(path: str) -> List[str]:
    """Prompts of a text file: one a line; blank lines and lines starting with ``#`` skipped; repeats once."""
    if not os.path.isfile(path):
        raise DreamFlowError(f"prompt file '{path}' does not exist; give a text file with one prompt a line")
    with open(path, encoding="utf-8") as f:
        lines = [" ".join(line.split()) for line in f]
    prompts = list(dict.fromkeys(p for p in lines if p and not p.startswith("#")))
    if not prompts:
        raise DreamFlowError(f"prompt file '{path}' holds no prompt; write one prompt a line ('#' starts a comment)")
    return prompts


def job_id(prompt: str, seed: int) -> str:
    """A folder name stable across calls: readable prompt words, a hash of the exact prompt, the seed."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "prompt"
    return f"{slug}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:6]}-s{seed}"


def plan_jobs(prompts: List[str], seeds: int, first_seed: int = 0) -> List[Job]:
    """Every (prompt, seed), prompt-major."""
    return [Job(job_id(p, s), p, s) for p in prompts for s in range(first_seed, first_seed + seeds)]


def job_sets(api: Dict[str, dict], defs, prompt: str, seed: int) -> List[str]:
    """``--set`` edits giving every node with a ``prompt`` / ``seed`` value input this job's prompt and seed."""
    sets = []
    for nid, entry in api.items():
        d = defs.get(entry.get("class_type"))
        for name, value in (("prompt", prompt), ("seed", seed)):
            inp = d.input(name) if d is not None else None
            if inp is not None and inp.takes_value:
                sets.append(f"{nid}.{name}={value}")
    return sets


def check_toy_prompt(api: Dict[str, dict], prompt: str) -> None:
    """The shipped toy prior knows only its world: refuse other prompts as the demo does (one line)."""
    from ..toy.world import parse_prompt

    for entry in api.values():
        name = (entry.get("inputs") or {}).get("model_name")
        if isinstance(name, str) and os.path.basename(os.path.normpath(name)) == TOY_MODEL:
            parse_prompt(prompt)
            return


def node_settings(api: Dict[str, dict]) -> Dict[str, dict]:
    """The value inputs of every node, by ``id:title-or-type`` (links left out): the job's settings."""
    out = {}
    for nid, entry in api.items():
        label = f"{nid}:{(entry.get('_meta') or {}).get('title') or entry.get('class_type')}"
        values = {k: v for k, v in (entry.get("inputs") or {}).items() if not isinstance(v, list)}
        if values:
            out[label] = values
    return out


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux), so a reused worker reports per job."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss_mib() -> Optional[float]:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    with contextlib.suppress(Exception):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return None


def run_job(spec: dict) -> dict:
    """Run one job (in a worker): the workflow with this job's prompt and seed, into a private temp folder.

    ``spec``: ``job``, ``prompt``, ``seed``, ``api`` (validated API prompt), ``ui`` (UI workflow or None),
    ``threads``. Returns ``{"record": ..., "files": {relative path: bytes}, "log": text}``; never raises for
    a failed run (the record says ``status: "failed"`` with a one-line ``error``).
    """
    from .. import hosting
    from ..errors import DreamFlowInterrupted
    from .cli import _env, saved_files
    from .defs import node_defs
    from .execute import run_prompt
    from .validate import apply_sets, validate_prompt

    t0 = time.time()
    record = {"job": spec["job"], "prompt": spec["prompt"], "seed": spec["seed"], "status": "failed", "error": None,
              "host": socket.gethostname(), "device": "cpu", "started": _now()}
    files: Dict[str, bytes] = {}
    log = io.StringIO()
    tmp = tempfile.mkdtemp(prefix="dreamflow-job-")
    _reset_peak_rss()
    gpu = None
    try:
        import torch

        torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            torch.cuda.reset_peak_memory_stats()
            record["device"] = gpu
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                _env(DREAMFLOW_OUTPUT=tmp, DREAMFLOW_INPUT=spec.get("input")):
            defs = node_defs(custom_nodes=spec.get("custom_nodes") or ())
            api = copy.deepcopy(spec["api"])
            apply_sets(api, job_sets(api, defs, spec["prompt"], spec["seed"]), defs)
            api = validate_prompt(api, defs)
            record["settings"] = node_settings(api)
            check_toy_prompt(api, spec["prompt"])
            hosting.clear_interrupt()
            result = run_prompt(api, defs, workflow=spec.get("ui"), log=lambda line: print(line, file=log))
            saved = saved_files(result.ui, tmp)
        record["timings"] = {"nodes_s": {f"{nid}:{api[nid].get('class_type')}": round(s, 2)
                                         for nid, s in result.seconds.items()}}
        for folder, _, names in os.walk(tmp):
            for name in sorted(names):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, tmp).replace(os.sep, "/")] = f.read()
        rel = [os.path.relpath(p, tmp).replace(os.sep, "/") for p in saved]
        glbs = [p for p in rel if p.lower().endswith(".glb")]
        if not glbs:
            raise DreamFlowError(f"the workflow saved no .glb (saved: {rel or 'nothing'}); it needs a DreamFlowSaveGLB "
                                 f"node")
        record["glb"] = glbs[-1]
        pngs = [p for p in rel if p.lower().endswith("_turntable.png")]
        record["turntable"] = pngs[-1] if pngs else None
        record["status"] = "ok"
    except DreamFlowInterrupted as e:
        record["error"] = one_line(f"interrupted: {e}")
    except DreamFlowError as e:
        record["error"] = one_line(e)
    except Exception as e:  # a bug or a crash of a library: the batch goes on, the log keeps the traceback
        record["error"] = one_line(f"{type(e).__name__}: {e}")
        log.write(traceback.format_exc())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if record["status"] != "ok":
        files = {}
    record.setdefault("timings", {})["total_s"] = round(time.time() - t0, 2)
    peak = {"rss_mib": _peak_rss_mib()}
    if gpu is not None:
        import torch

        peak["gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        peak["gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
    record["peak_memory"] = peak
    return {"record": record, "files": files, "log": log.getvalue()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# The output folder (the driver is its only writer)
# ----------------------------------------------------------------------------------------------
class OutputFolder:
    """``DIR``: done job folders, the manifest, failure logs (layout in the module docstring)."""

    TMP = ".tmp-"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.manifest = os.path.join(self.root, "manifest.jsonl")
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # leftovers of a killed driver: never a done job
            if name.startswith(self.TMP):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def check_workflow(self, fingerprint: dict) -> None:
        """Every job of one folder runs one workflow: refuse to mix in jobs of another (one-line error)."""
        path = os.path.join(self.root, "batch.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("sha256") != fingerprint["sha256"]:
                raise DreamFlowError(
                    f"output folder '{self.root}' holds jobs of another workflow or other --set values "
                    f"(its batch.json: {old.get('workflow')}); give another --output, or delete {path} to add "
                    f"jobs of this workflow to it")
            return
        self._write_atomic(path, json.dumps(fingerprint, indent=1).encode("utf-8"))

    def done(self) -> Dict[str, dict]:
        """Job id -> its record, for every done job (a folder with job.json)."""
        out = {}
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name, "job.json")
            if not name.startswith(".") and os.path.isfile(path):
                with contextlib.suppress(ValueError, OSError):
                    with open(path, encoding="utf-8") as f:
                        out[name] = json.load(f)
        return out

    def manifest_records(self) -> List[dict]:
        """The manifest's lines (a torn last line of a killed driver is skipped)."""
        rows = []
        if os.path.exists(self.manifest):
            with open(self.manifest, encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        rows.append(json.loads(line))
        return rows

    def reconcile(self, done: Dict[str, dict]) -> None:
        """A driver killed between a job's rename and its manifest line: write the line from job.json."""
        listed = {r.get("job") for r in self.manifest_records() if r.get("status") == "ok"}
        for jid in sorted(set(done) - listed):
            self._append(done[jid])

    def _append(self, record: dict) -> None:
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, record: dict, files: Dict[str, bytes], log: str) -> dict:
        """Write a finished job: files into a temp folder, renamed to ``DIR/<job>`` at the end; then its line.

        Returns the record as written (paths relative to ``DIR``)."""
        jid = record["job"]
        tmp = os.path.join(self.root, f"{self.TMP}{jid}")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, data in files.items():
            path = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        record = dict(record, files=[f"{jid}/{rel}" for rel in files],
                      glb=f"{jid}/{record['glb']}", turntable=record["turntable"] and f"{jid}/{record['turntable']}")
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "log.txt"), "w", encoding="utf-8") as f:
            f.write(log)
        with open(os.path.join(tmp, "job.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(self.root, jid)
        if os.path.exists(final):  # a folder without job.json (never done): replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.root, "failed", f"{jid}.log"))
        self._append(record)
        return record

    def fail(self, record: dict, log: str) -> None:
        """Record a job that failed every attempt: its line in the manifest, its log in ``failed/``."""
        os.makedirs(os.path.join(self.root, "failed"), exist_ok=True)
        self._write_atomic(os.path.join(self.root, "failed", f"{record['job']}.log"), log.encode("utf-8"))
        self._append(record)


# ----------------------------------------------------------------------------------------------
# Backends: Ray tasks, or spawned processes
# ----------------------------------------------------------------------------------------------
class RayBackend:
    """Jobs as Ray tasks (``num_gpus`` / ``num_cpus`` each); local Ray unless an address is given."""

    name = "Ray"

    def __init__(self, address: Optional[str], workers: Optional[int], gpus_per_job: Optional[float],
                 cpus_per_job: float, ship_code: bool):
        import ray

        self.ray = ray
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address:
            env = {"working_dir": PACK_ROOT, "excludes": SHIP_EXCLUDES} if ship_code else {}
            ray.init(address=address, runtime_env={**env, "env_vars": dict(JOB_ENV)}, **kwargs)
            self.where = f"the Ray cluster at {address}"
        else:
            if gpus_per_job == 0 and workers:
                kwargs["num_cpus"] = max(1, int(workers * cpus_per_job))
            # local workers import the pack from here
            path = os.pathsep.join(p for p in (PACK_ROOT, os.environ.get("PYTHONPATH")) if p)
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": path, **JOB_ENV}}, **kwargs)
            self.where = "local Ray"
        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
        if gpus_per_job is None:
            gpus_per_job = 1.0 if gpus > 0 else 0.0
        if gpus_per_job > 0 and gpus == 0:
            ray.shutdown()
            raise DreamFlowError(f"--gpus-per-job {gpus_per_job:g} but {self.where} has no GPU; use --gpus-per-job 0 "
                                 f"(CPU jobs, e.g. with the toy prior) or a cluster with GPUs")
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        fit = int(gpus // gpus_per_job) if gpus_per_job > 0 else int(cpus // max(cpus_per_job, 1e-9))
        self.workers = max(1, min(workers, fit) if workers else fit)
        self.remote = ray.remote(run_job).options(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=0)
        self.pending: Dict[object, object] = {}

    def submit(self, key, spec: dict) -> None:
        self.pending[self.remote.remote(spec)] = key

    def wait(self, timeout: float) -> List[Tuple[object, dict]]:
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in ready:
            key = self.pending.pop(ref)
            try:
                out.append((key, self.ray.get(ref)))
            except Exception as e:  # the worker died (killed, out of memory): a failed attempt
                out.append((key, {"crash": one_line(f"{type(e).__name__}: {e}", 300)}))
        return out

    def cancel(self) -> None:
        for ref in list(self.pending):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self.pending.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def _process_entry(spec: dict, conn) -> None:
    """A spawned job process: Ctrl-C is the driver's to handle (it terminates us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = run_job(spec)
    except BaseException as e:
        result = {"crash": one_line(f"{type(e).__name__}: {e}", 300)}
    conn.send(result)
    conn.close()


class ProcessBackend:
    """Without Ray: one spawned process per job, at most ``workers`` at once, each pinned to its GPU slot."""

    name = "local processes"

    def __init__(self, workers: Optional[int], gpus_per_job: Optional[float], cpus_per_job: float,
                 why: str = "Ray is not installed: pip install comfyui-dreamflow[batch]"):
        import multiprocessing as mp

        import torch

        self.ctx = mp.get_context("spawn")
        ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus_per_job is None:
            gpus_per_job = 1.0 if ngpu else 0.0
        if gpus_per_job > 0 and ngpu == 0:
            raise DreamFlowError(f"--gpus-per-job {gpus_per_job:g} but this machine has no CUDA GPU; use "
                                 f"--gpus-per-job 0 (CPU jobs, e.g. with the toy prior)")
        if gpus_per_job > 1:
            raise DreamFlowError("without Ray a job runs on one GPU at most; use --gpus-per-job 1 (or 0.5 for two "
                                 "jobs a card), or install Ray (pip install comfyui-dreamflow[batch])")
        if gpus_per_job > 0:  # slots name the devices as this process sees them (CUDA_VISIBLE_DEVICES kept)
            visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            ids = visible[:ngpu] if len(visible) >= ngpu else [str(g) for g in range(ngpu)]
            slots = [d for d in ids for _ in range(int(1 / gpus_per_job))]
        else:
            slots = [""] * max(1, int((os.cpu_count() or 1) // max(cpus_per_job, 1)))
        if workers:
            slots = [""] * workers if gpus_per_job == 0 else slots[:workers]
        self.free: List[str] = slots
        self.workers = len(slots)
        self.gpus_per_job, self.cpus_per_job = gpus_per_job, cpus_per_job
        self.where = f"local processes ({why})"
        self.running: Dict[object, tuple] = {}

    def submit(self, key, spec: dict) -> None:
        slot = self.free.pop(0)
        recv, send = self.ctx.Pipe(duplex=False)
        # a spawned child inherits os.environ as it is at start(): set its variables around that call
        from .cli import environ

        with environ(**JOB_ENV, CUDA_VISIBLE_DEVICES=slot):  # "" hides every GPU from a CPU job
            proc = self.ctx.Process(target=_process_entry, args=(spec, send), daemon=True)
            proc.start()
        send.close()
        self.running[key] = (proc, recv, slot)

    def wait(self, timeout: float) -> List[Tuple[object, dict]]:
        from multiprocessing.connection import wait

        if not self.running:
            return []
        wait([r for _, r, _ in self.running.values()] + [p.sentinel for p, _, _ in self.running.values()], timeout)
        out = []
        for key, (proc, recv, slot) in list(self.running.items()):
            result = None
            if recv.poll():
                try:
                    result = recv.recv()
                except (EOFError, OSError):
                    result = {"crash": f"the job's process died (exit code {proc.exitcode})"}
            elif not proc.is_alive():
                result = {"crash": f"the job's process died (exit code {proc.exitcode})"}
            if result is not None:
                proc.join(30)
                recv.close()
                del self.running[key]
                self.free.append(slot)
                out.append((key, result))
        return out

    def cancel(self) -> None:
        for proc, recv, slot in self.running.values():
            proc.terminate()
        for proc, recv, slot in self.running.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            recv.close()
            self.free.append(slot)
        self.running.clear()

    def close(self) -> None:
        self.cancel()


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    total: int
    skipped: int
    ok: int
    failed: int
    interrupted: bool


class _Stop:
    """Ctrl-C sets a flag (the driver loop then stops between its writes); restored on exit."""

    def __enter__(self):
        self.requested = False
        self._old = None
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def make_backend(backend: str, ray_address: Optional[str], workers: Optional[int], gpus_per_job: Optional[float],
                 cpus_per_job: float, ship_code: bool = True):
    """``backend``: "auto" (Ray when installed), "ray" or "process"."""
    import importlib.util

    has_ray = importlib.util.find_spec("ray") is not None
    if backend == "ray" or ray_address or (backend == "auto" and has_ray):
        if backend == "process":
            raise DreamFlowError("--ray ADDRESS needs the Ray backend; drop --backend process")
        if not has_ray:
            raise DreamFlowError("Ray is not installed; pip install comfyui-dreamflow[batch] (or pip install ray), or "
                                 "drop --ray / --backend ray to run jobs in local processes")
        return RayBackend(ray_address, workers, gpus_per_job, cpus_per_job, ship_code)
    return ProcessBackend(workers, gpus_per_job, cpus_per_job,
                          "--backend process" if has_ray else "Ray is not installed: pip install comfyui-dreamflow[batch]")


def run_batch(prompts_path: str, workflow: str, output: str, *, seeds: int = 1, first_seed: int = 0,
              sets: Optional[List[str]] = None, backend: str = "auto", ray_address: Optional[str] = None,
              workers: Optional[int] = None, gpus_per_job: Optional[float] = None, cpus_per_job: float = 1,
              ship_code: bool = True, input_dir: Optional[str] = None, custom_nodes=(),
              log: Callable[[str], None] = print) -> BatchSummary:
    """Run every (prompt, seed) job of a batch not yet done in ``output``; see the module docstring."""
    from .cli import prepare

    if seeds < 1:
        raise DreamFlowError(f"--seeds {seeds}: give 1 or more")
    if gpus_per_job is not None and gpus_per_job < 0:
        raise DreamFlowError(f"--gpus-per-job {gpus_per_job:g}: give 0 (CPU jobs) or more")
    prompts = read_prompts(prompts_path)
    custom_nodes = [os.path.abspath(d) for d in custom_nodes]
    api, ui, defs = prepare(workflow, list(sets or []), log=lambda line: None, custom_nodes=custom_nodes)
    jobs = plan_jobs(prompts, seeds, first_seed)
    probe = copy.deepcopy(api)
    edits = job_sets(probe, defs, jobs[0].prompt, jobs[0].seed)
    if not any(e.split("=", 1)[0].endswith(".prompt") for e in edits):
        raise DreamFlowError(f"workflow '{workflow}' has no node with a 'prompt' value input (e.g. DreamFlowNeRFStage); "
                             f"a batch sets each job's prompt there")
    from .validate import apply_sets

    apply_sets(probe, edits, defs)  # the per-job edits fit the workflow
    folder = OutputFolder(output)
    canonical = json.dumps(api, sort_keys=True, default=str).encode("utf-8")
    folder.check_workflow({"workflow": os.path.abspath(workflow), "sets": list(sets or []),
                           "sha256": hashlib.sha256(canonical).hexdigest(), "api": api})
    done = folder.done()
    folder.reconcile(done)
    todo = [j for j in jobs if j.id not in done]
    summary = BatchSummary(total=len(jobs), skipped=len(jobs) - len(todo), ok=0, failed=0, interrupted=False)
    log(f"batch: {len(jobs)} jobs ({len(prompts)} prompts x {seeds} seeds), {summary.skipped} done before, "
        f"{len(todo)} to run")
    if not todo:
        log(f"batch: nothing to do; manifest {folder.manifest}")
        return summary
    runner = make_backend(backend, ray_address, workers, gpus_per_job, cpus_per_job, ship_code)
    per = f"{runner.gpus_per_job:g} GPU" if runner.gpus_per_job > 0 else f"{runner.cpus_per_job:g} CPU"
    log(f"batch: on {runner.where}: {runner.workers} at once, {per} per job")
    queue: Deque[Tuple[Job, int, List[str]]] = collections.deque((j, 1, []) for j in todo)
    inflight: Dict[str, Tuple[Job, int, List[str]]] = {}
    t0, finished = time.time(), 0
    threads = max(1, int(cpus_per_job))
    try:
        with _Stop() as stop:
            while (queue or inflight) and not stop.requested:
                while queue and len(inflight) < runner.workers:
                    job, attempt, errors = queue.popleft()
                    inflight[job.id] = (job, attempt, errors)
                    runner.submit(job.id, {"job": job.id, "prompt": job.prompt, "seed": job.seed, "api": api,
                                           "ui": ui, "threads": threads, "custom_nodes": custom_nodes,
                                           "input": input_dir and os.path.abspath(input_dir)})
                for key, result in runner.wait(0.5):
                    if stop.requested:
                        break  # results after Ctrl-C are dropped: the next call runs those jobs again
                    job, attempt, errors = inflight.pop(key)
                    record = result.get("record") or {"job": job.id, "prompt": job.prompt, "seed": job.seed,
                                                      "status": "failed", "error": result.get("crash")}
                    record["attempts"] = attempt
                    elapsed = (record.get("timings") or {}).get("total_s")
                    what = f"'{job.prompt}' seed {job.seed}"
                    if record["status"] == "ok":
                        record["finished"] = _now()
                        if errors:
                            record["earlier_errors"] = errors
                        record = folder.commit(record, result.get("files") or {}, result.get("log") or "")
                        summary.ok += 1
                        finished += 1
                        status = f"ok     {what} in {elapsed:.0f} s -> {os.path.join(folder.root, record['glb'])}"
                    elif attempt < ATTEMPTS:
                        queue.appendleft((job, attempt + 1, errors + [record["error"]]))
                        status = f"retry  {what}: {record['error']}"
                    else:
                        record["finished"] = _now()
                        record["earlier_errors"] = errors
                        folder.fail(record, result.get("log") or str(record["error"]))
                        summary.failed += 1
                        finished += 1
                        status = f"FAILED {what} after {attempt} attempts: {record['error']}"
                    left = len(todo) - finished
                    eta = ""
                    if finished and left:
                        eta = f", ~{(time.time() - t0) / finished * left / 60:.1f} min left"
                    log(f"batch: [{finished}/{len(todo)}] {status} ({len(inflight)} running, {len(queue)} queued"
                        f"{eta})")
            summary.interrupted = stop.requested
            if stop.requested:
                runner.cancel()
    finally:
        runner.cancel()
        runner.close()
    if summary.interrupted:
        log(f"batch: interrupted: {summary.ok} done, {summary.failed} failed, {len(todo) - finished} not run "
            f"(nothing half-written); the same command resumes")
    else:
        wall = time.time() - t0
        rate = f", {summary.ok / wall * 3600:.1f} jobs / hour" if summary.ok else ""
        log(f"batch: {summary.ok} ok, {summary.failed} failed, {summary.skipped} done before; {wall / 60:.1f} min"
            f"{rate}; manifest {folder.manifest}")
    return summary


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", help="text file: one prompt a line (blank lines and '#' comments skipped)")
    p.add_argument("--workflow", required=True, help="workflow .json (UI or API format) every job runs")
    p.add_argument("--output", required=True, metavar="DIR", help="batch folder (a second call resumes there)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per prompt: first-seed .. first-seed+N-1")
    p.add_argument("--first-seed", type=int, default=0, metavar="S", help="first seed (default 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="change an input of the workflow for every job, as in `run` (repeatable)")
    p.add_argument("--input", metavar="DIR", help="input folder for Load State / Load Mesh (default: $DREAMFLOW_INPUT "
                                                  "or ./input)")
    p.add_argument("--nodes", dest="custom_nodes", action="append", default=[], metavar="DIR",
                   help="also load this custom-node folder, as `run --nodes` (repeatable)")
    p.add_argument("--ray", dest="ray_address", metavar="ADDRESS",
                   help="a running Ray cluster ('auto', 'ray://head:10001', 'head:6379'); default: local Ray")
    p.add_argument("--backend", choices=("auto", "ray", "process"), default="auto",
                   help="auto (default): Ray when installed, else local processes")
    p.add_argument("--gpus-per-job", type=float, default=None, metavar="G",
                   help="GPUs a job holds (default: 1 where there are GPUs, else 0; 0.5 runs two jobs a card)")
    p.add_argument("--cpus-per-job", type=float, default=1, metavar="C", help="CPU cores (torch threads) a job holds")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="jobs at once (default: as many as the GPUs or cores hold)")
    p.add_argument("--no-ship-code", dest="ship_code", action="store_false",
                   help="with --ray: do not send this pack's folder to the cluster (its nodes have it installed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend choices and engine details")


def batch_command(args: argparse.Namespace) -> int:
    """The ``batch`` subcommand: 0 all done, 2 a user error, 3 some jobs failed, 130 interrupted."""
    from .cli import EXIT_INTERRUPTED, EXIT_USER_ERROR

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        summary = run_batch(args.prompts, args.workflow, args.output, seeds=args.seeds, first_seed=args.first_seed,
                            sets=args.sets, backend=args.backend, ray_address=args.ray_address, workers=args.workers,
                            gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                            ship_code=args.ship_code, input_dir=args.input, custom_nodes=args.custom_nodes,
                            log=lambda line: print(line, flush=True))
    except DreamFlowError as e:
        print(f"dreamflow: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if summary.failed else 0
