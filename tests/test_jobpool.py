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


def _slow_run(job):
    with open(job[0], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)  # a long job: the worker is busy when its parent dies
    return {"job": list(job)}


def _slow_worker(jobs, results):
    serve(jobs, results, _slow_run)


def _parent(pid_file):
    run_jobs([(pid_file,)], _slow_worker, (), workers=1, deadline_s=300, describe=lambda r: "")


def _start_sweep(tmp_path):
    """A sweep's parent process running one slow job; (parent, its worker's pid) once the worker is busy."""
    import torch.multiprocessing as mp

    pid_file = str(tmp_path / "worker.pid")
    parent = mp.get_context("spawn").Process(target=_parent, args=(pid_file,))
    parent.start()
    t0 = time.time()
    while not (os.path.exists(pid_file) and open(pid_file).read()) and time.time() - t0 < 60:
        time.sleep(0.1)
    return parent, int(open(pid_file).read())


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def _gone_within(pid, seconds):
    t0 = time.time()
    while _alive(pid) and time.time() - t0 < seconds:
        time.sleep(0.1)
    return not _alive(pid)


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    """Killing a sweep's parent (SIGKILL: no clean-up runs) left its busy workers running for minutes; a worker
    now sees its parent gone and ends within about a second, mid-job."""
    import signal

    parent, worker_pid = _start_sweep(tmp_path)
    assert _alive(worker_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join(10)
    assert _gone_within(worker_pid, 10)


def test_sigterm_to_the_parent_ends_its_workers(tmp_path):
    import signal

    parent, worker_pid = _start_sweep(tmp_path)
    os.kill(parent.pid, signal.SIGTERM)
    parent.join(20)
    assert parent.exitcode is not None
    assert _gone_within(worker_pid, 3)
