"""bench/jobpool.py: the toy benchmarks' job queue serves every job with every worker it starts."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.jobpool import run_jobs, serve  # noqa: E402


def _run(job):
    if job == ("bad",):
        raise ValueError("no such job\nsecond line")
    time.sleep(0.05)  # long enough that both workers are at the queue together
    return {"job": list(job), "pid": os.getpid()}


def _worker(jobs, results):
    serve(jobs, results, _run)


def test_every_worker_serves_jobs_and_a_failed_job_is_one_line():
    """A non-blocking get raised queue.Empty while the other worker held the queue's lock, ending workers early (a
    2-worker sweep ran on one); with end marks both workers take jobs until the queue is done."""
    jobs = [(i,) for i in range(24)] + [("bad",)]  # jobs are tuples, as the benchmarks' are
    rows = run_jobs(jobs, _worker, (), workers=2, deadline_s=60, describe=lambda r: "")
    assert sorted(str(r["job"]) for r in rows) == sorted(str(list(j)) for j in jobs)
    assert len({r["pid"] for r in rows if "pid" in r}) == 2
    assert [r["error"] for r in rows if "error" in r] == ["ValueError: no such job"]


def test_a_worker_waits_while_another_holds_the_queue():
    """The failure itself, made certain: while another worker holds the queue's read lock (it is taking a job), a
    worker that starts must wait for the lock, not read the held lock as an empty queue and end."""
    import threading

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for j in [(1,), (2,), None]:
        jobs.put(j)
    time.sleep(0.2)  # the queue's feeder thread has written them
    jobs._rlock.acquire()  # as a worker reading a job holds it
    t = threading.Thread(target=serve, args=(jobs, results, lambda job: {"job": list(job)}))
    t.start()
    time.sleep(0.3)
    jobs._rlock.release()
    t.join(10)
    assert not t.is_alive()
    assert sorted(results.get(timeout=5)["job"][0] for _ in range(2)) == [1, 2]
