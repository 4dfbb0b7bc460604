"""A shared job queue served by spawned worker processes, for the toy-world benchmarks (toy_quality, glb_fidelity).

``run_jobs(jobs, target, args, workers, deadline_s, describe)`` puts every job on one queue, starts ``workers``
processes running ``target(jobs_queue, results_queue, *args)`` (each takes jobs until it takes the end mark, None,
one of which follows the jobs per worker, and puts one result dict per job), and collects results until all are in,
every worker has ended, or ``deadline_s`` passed (the rest is left undone). ``describe(result)`` gives the progress
line's tail.

Workers block on the queue until the end mark: a non-blocking ``get`` raises ``queue.Empty`` while another worker
holds the queue's read lock, which ended workers early (a 2-worker CPU sweep ran on one, 2026-12-07).

Nothing outlives the parent: a worker ends itself within a second once its parent is gone (killed, even with
SIGKILL, which runs no clean-up), and the parent ends its workers on SIGTERM as on Ctrl-C or an error.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Callable, List, Sequence


def run_jobs(jobs_list: Sequence, target: Callable, args: tuple, workers: int, deadline_s: float,
             describe: Callable[[dict], str]) -> List[dict]:
    import torch.multiprocessing as mp

    t0 = time.time()
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for j in jobs_list:
        jobs.put(j)
    for _ in range(workers):
        jobs.put(None)  # one end mark per worker
    procs = [ctx.Process(target=target, args=(jobs, results, *args), daemon=True) for _ in range(workers)]
    rows: List[dict] = []
    old_term = _raise_on_sigterm()
    try:
        for pr in procs:
            pr.start()
        while len(rows) < len(jobs_list) and time.time() - t0 < deadline_s:
            try:
                r = results.get(timeout=5)
            except queue.Empty:
                if not any(pr.is_alive() for pr in procs):
                    break
                continue
            rows.append(r)
            tag = "error " + r["error"] if "error" in r else describe(r)
            print(f"[{time.time() - t0:6.0f} s] {len(rows)}/{len(jobs_list)} {r['job']} {tag}", flush=True)
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
        for pr in procs:
            if pr.pid is not None:
                pr.join(5)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return rows


def _raise_on_sigterm():
    """SIGTERM ends the parent through its ``finally`` (workers terminated), as Ctrl-C does; the old handler, or
    None where no handler can be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _stop)


def _exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    """Watch (in a daemon thread) for the parent's death, seen as a new parent pid, and end this process at once."""
    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def serve(jobs, results, run: Callable[[tuple], dict]) -> None:
    """A worker's loop: take jobs until the end mark (None); a job that raises is reported as a one-line error. The
    worker ends itself if its parent dies (a killed sweep leaves no worker burning a core)."""
    _exit_when_orphaned(os.getppid())
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            res = run(job)
        except Exception as e:  # one failed run is reported, not fatal
            res = {"job": list(job), "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        results.put(res)


#: Environment variable: the toy prior folder :func:`load_toy` loads instead of the shipped one.
PRIOR_ENV = "DREAMFLOW_BENCH_PRIOR"


def load_toy(device: str, threads: int, classifier_device: str):
    """(toy prior as a float32 Denoiser on ``device``, world classifier) for a worker; warnings off."""
    import logging
    import os

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    from dreamflow.denoisers import Denoiser
    from dreamflow.denoisers.loading import REPO_MODELS_DIR
    from dreamflow.toy.classifier import load_classifier
    from dreamflow.toy.prior import TOY_MODEL_NAME

    # float32 on every device: the toy prior is small, and the scene LoRA then trains in full precision.
    # PRIOR_ENV (a benchmark's --prior) names another toy prior folder, e.g. a retrained candidate.
    prior = os.environ.get(PRIOR_ENV) or os.path.join(REPO_MODELS_DIR, TOY_MODEL_NAME)
    den = Denoiser.load(prior, device=device, dtype="fp32")
    clf = load_classifier(os.path.join(prior, "classifier", "model.safetensors"), classifier_device)
    return den, clf
