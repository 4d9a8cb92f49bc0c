"""One-thread CPU workers for independent small solves, and "start now, collect later".

LAPACK's symmetric eigensolver barely uses a second core for matrices in the hundreds, and MKL's products
with a few columns scale poorly across threads: on a CPU such jobs finish sooner side by side, one per core,
each on one thread, than one after another on all of them. A worker left at the process's thread count
oversubscribes the cores. `start` hands a list of jobs to the pool, largest first, and returns a function
that waits for them: a caller can start one kind of job (a step's gradient spectra) and put another ahead of
what is still queued (`first=True`: the same step's input spectra), so that both kinds share the cores.
At exit the queued jobs are cancelled and the running ones finished first: a worker thread still inside torch
when the interpreter tears down aborts the process (SIGABRT) instead of letting it exit.

On an AMD CPU handing jobs over also ends the caller's idle OpenMP team (`release_openmp_threads`; the rule is
`releases_openmp`, SPECSCOPE_OPENMP_RELEASE overrides it). After each parallel region torch runs, libgomp's threads
spin-wait for the next one, by default for 6–10 ms of a core, taken from the workers just as they start: on an AMD
EPYC the team thread used 9–13 ms of CPU during a 30 ms `polar_later` of one d=256 GPT block's six matrices, and
ending it made that call 14 % shorter. On an Intel Xeon (AVX-512, AMX) ending it cost more than the spinning: the
caller blocked 3.6–5.5 ms in the pause beside two busy workers and its next parallel region started a new team, and
a probe's measured step took 5–11 ms longer with it (docs/linalg.md "The caller's OpenMP team").
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import itertools
import os
import queue
import sys
import threading
from contextlib import contextmanager
from concurrent.futures import Future
from typing import Callable, Sequence, TypeVar

import torch

from specscope import settings

from ._cpu import cpu_vendor, last_level_cache

T = TypeVar("T")
R = TypeVar("R")


class Pool:
    """`threads` daemon workers, each running torch with one thread, taking jobs by priority then age."""

    def __init__(self, threads: int):
        self.threads, self.pid = threads, os.getpid()
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._pending = 0  # submitted and not yet finished
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        for i in range(threads):
            threading.Thread(target=self._work, name=f"specscope-worker-{i}", daemon=True).start()

    def _work(self) -> None:
        # torch gives a thread the process-wide count at its first parallel call: take it now, then set one
        # (a later set_num_threads elsewhere would otherwise reach this thread through that first call)
        torch.get_num_threads()
        torch.set_num_threads(1)
        while True:
            _, _, fn, arg, future = self._jobs.get()
            if future is None:  # close(): this worker ends
                return
            try:
                if not future.set_running_or_notify_cancel():
                    continue
                with torch.no_grad():  # a new thread starts with grad mode on: measuring must not build graphs
                    future.set_result(fn(arg))
            except BaseException as e:  # handed to whoever waits for this job
                future.set_exception(e)
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def submit(self, fn: Callable[[T], R], arg: T, first: bool = False) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending += 1
        self._jobs.put((0 if first else 1, next(self._order), fn, arg, future))
        return future

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        futures = [self.submit(fn, x) for x in items]
        if releases_openmp():
            release_openmp_threads()
        with waiting():
            return [f.result() for f in futures]

    def close(self) -> None:
        """End the workers once the jobs queued so far are done (their waiters still get their results)."""
        for _ in range(self.threads):
            self._jobs.put((2, next(self._order), None, None, None))

    def busy(self) -> bool:
        """Whether jobs are running or queued."""
        with self._lock:
            return self._pending > 0

    def drain(self) -> None:
        """Cancel the queued jobs and wait for the running ones (their waiters get CancelledError)."""
        while True:
            try:
                *_, future = self._jobs.get_nowait()
            except queue.Empty:
                break
            future.cancel()
            with self._lock:
                self._pending -= 1
        with self._idle:
            self._idle.wait_for(lambda: self._pending <= 0)


_POOL: Pool | None = None

RELEASE_ENV = "SPECSCOPE_OPENMP_RELEASE"
RELEASE_OPENMP: bool | None = None  # True/False: `start` and `Pool.map` end / leave the caller's idle team; None: the env
_OMP_PAUSE_SOFT = 1  # omp_pause_soft (OpenMP 5.0): the runtime may free idle resources and keeps its settings


@functools.cache
def _omp_pause() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the libgomp this process loaded (torch's OpenMP runtime on Linux), or None:
    no libgomp (other OpenMP runtimes are left alone: their pause was not measured here), no /proc, or a
    libgomp older than OpenMP 5.0 (GCC 9)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if line.rstrip().rsplit("/", 1)[-1].startswith("libgomp")})
    except OSError:
        return None
    for path in paths:
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


_FORKED = False  # set in a forked child: its copy of the parent's team has no threads, and libgomp would wait on them


def _forked() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_forked)


WAIT_SWITCH = 5e-4  # Python's switch interval (s) while a caller waits on the workers (None: leave it)
_waiters = 0
_saved_switch = 0.005
_waiters_lock = threading.Lock()


def _set_switch(seconds: float) -> None:
    """sys.setswitchinterval to the whole microsecond nearest `seconds`: CPython truncates to microseconds, so
    setting back what getswitchinterval read could lose one (1e-4 reads as 9.999…e-05 and is set as 99 µs)."""
    sys.setswitchinterval((round(seconds * 1e6) + 0.5) / 1e6)


@contextmanager
def waiting():
    """Python's thread switch interval at WAIT_SWITCH while a caller waits for the workers, restored when the last
    waiter is done. Two workers share Python's lock between their torch calls; one that comes back from a long LAPACK
    call while the other runs many small calls waits for the lock until the interval (5 ms by default) forces a
    switch. A measured step of the probe finished 2.2 ms sooner at 0.5 ms (median of 30 alternating steps,
    66.5 against 68.7 ms; docs/linalg.md "Threads")."""
    global _waiters, _saved_switch
    with _waiters_lock:
        if _waiters == 0:
            _saved_switch = sys.getswitchinterval()
            if WAIT_SWITCH is not None and WAIT_SWITCH < _saved_switch:
                _set_switch(WAIT_SWITCH)
        _waiters += 1
    try:
        yield
    finally:
        with _waiters_lock:
            _waiters -= 1
            if _waiters == 0:
                _set_switch(_saved_switch)


def release_choice() -> str:
    """SPECSCOPE_OPENMP_RELEASE, checked: "auto" (unset), "on" or "off"."""
    return settings.read(RELEASE_ENV)


def releases_openmp() -> bool:
    """Whether a hand-over to the workers ends the caller's idle OpenMP team: `RELEASE_OPENMP` where set, else
    SPECSCOPE_OPENMP_RELEASE ("on", "off"; "auto" or unset: on an AMD CPU only, where it was measured to pay)."""
    if RELEASE_OPENMP is not None:
        return RELEASE_OPENMP
    choice = release_choice()
    return choice == "on" or (choice == "auto" and cpu_vendor() == "AuthenticAMD")


def release_openmp_threads() -> None:
    """End the calling thread's idle libgomp team now, instead of letting it spin-wait for a next parallel region
    that will not come while this thread waits for the workers (`start` and `Pool.map` call it where
    `releases_openmp()`). The caller's next parallel region starts a new team (45–75 µs more for that one region on
    the AMD EPYC); its thread count (omp_get_max_threads, torch.get_num_threads) is kept. Other threads' teams are
    untouched. Inside a parallel region, or without libgomp, nothing happens; nor in a forked child, where the
    parent's team is a record of threads that were not copied (libgomp would wait for them forever, as it does at
    the child's first parallel region)."""
    fn = _omp_pause() if not _FORKED else None
    if fn is not None:
        fn(_OMP_PAUSE_SOFT)


def count(device: torch.device) -> int:
    """Workers the pool would use for jobs on `device`: torch's thread count on a CPU with ≥ 2, else 0."""
    threads = torch.get_num_threads()
    return threads if device.type == "cpu" and threads >= 2 else 0


def pool(threads: int) -> Pool:
    """The process's pool of `threads` workers (made anew in a forked child, where the parent's worker
    threads do not exist, and when the thread count changed, the old one's workers ending after their jobs)."""
    global _POOL
    if _POOL is None or _POOL.threads != threads or _POOL.pid != os.getpid():
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()  # a thread count changed: the old workers end after their jobs, not idle for good
        _POOL = Pool(threads)
    return _POOL


@atexit.register
def _drain_at_exit() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.drain()


def busy(device: torch.device) -> bool:
    """Whether the pool that jobs on `device` would use has jobs running or queued."""
    n = count(device)
    return bool(n) and _POOL is not None and _POOL.threads == n and _POOL.pid == os.getpid() and _POOL.busy()


def start(fn: Callable[[T], R], items: Sequence[T], costs: Sequence[float] | None = None,
          device: torch.device | None = None, first: bool = False) -> Callable[[], list[R]]:
    """Begin fn(item) for every item on the pool's one-thread workers (largest `costs` first, so the last jobs
    to start are short; `first=True` puts them ahead of jobs already queued); the returned function waits and
    gives the results in item order. Without a pool (one thread, or an accelerator) the jobs run, in order,
    when that function is called."""
    n = count(device or torch.device("cpu"))
    if n == 0 or len(items) == 0:
        return lambda: [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -costs[i]) if costs is not None else range(len(items))
    futures = {i: pool(n).submit(fn, items[i], first) for i in order}
    if releases_openmp():
        release_openmp_threads()

    def collect() -> list[R]:
        try:
            with waiting():
                return [futures[i].result() for i in range(len(items))]
        except BaseException:  # one job failed (or the wait was interrupted): its siblings not yet started never run
            for f in futures.values():
                f.cancel()
            raise

    return collect


def balanced(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices split into at most `parts` non-empty lists of near-equal total cost (largest first, each to the
    lightest list)."""
    out: list[list[int]] = [[] for _ in range(max(1, parts))]
    load = [0.0] * len(out)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = load.index(min(load))
        out[j].append(i)
        load[j] += costs[i]
    return [o for o in out if o]


CACHE_SHARE = 16  # a job's batch of memory-bound passes stays within 1/16 of the last-level cache (see cache_chunks)


def cache_chunks(nbytes: Sequence[int], cache: int | None = None) -> list[list[int]]:
    """Indices in order, split into consecutive runs whose bytes stay within `cache` / CACHE_SHARE (`cache`: the
    last-level cache's bytes, `last_level_cache()` by default; 0 or unknown: one run of all), each run at least one
    index. For a job that makes several passes over each of its inputs (`probe.estimators.finish_implicit`'s block
    Krylov solves): inputs solved together are read pass after pass, so once they outgrow the cache every pass
    comes from memory again, while an input solved alone is read from memory once and its later passes hit the
    cache. On an AMD EPYC (32 MiB L3) a GPT d=256 step's 17 inputs (13 of 2 MiB, 4 of 8 MiB) took 31 ms one by one
    against 40 ms in two batches, one thread, caches cold (runs of 2: 33 ms, of 4: 35 ms); on a CPU whose cache
    holds them all the runs are the whole list, as before: there batching saves the small algebra's per-call cost."""
    budget = (last_level_cache() if cache is None else cache) // CACHE_SHARE
    if budget <= 0:
        return [list(range(len(nbytes)))] if len(nbytes) else []
    out: list[list[int]] = []
    used = 0
    for i, b in enumerate(nbytes):
        if not out or used + b > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += b
    return out
