"""The one-thread CPU workers: results in item order, jobs put first run before queued ones, errors reach
the caller, the caller's idle OpenMP threads stop spinning while it waits, and ‖G‖_F, ‖G‖_* started on them
equal the serial route and float64 SVD."""

import importlib
import os
import sys
import threading
import time

import pytest
import torch

from specscope import linalg as L
from specscope.linalg import norms, workers


def test_start_gives_results_in_item_order_on_one_thread_workers(two_threads):
    seen = []

    def job(x):
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
        return x * x

    wait = workers.start(job, [3, 1, 2], costs=[1.0, 5.0, 2.0])
    assert wait() == [9, 1, 4]
    assert all(name.startswith("specscope-worker") and threads == 1 and not grad for name, threads, grad in seen), seen
    assert torch.get_num_threads() == 2  # the caller's thread count is its own


def test_jobs_put_first_run_before_queued_ones(two_threads):
    gates = [threading.Event(), threading.Event()]
    order = []
    block = workers.start(lambda gate: gate.wait(10), gates)  # both workers held
    late = workers.start(order.append, ["queued"])
    early = workers.start(order.append, ["first"], first=True)
    assert workers.busy(torch.device("cpu"))
    gates[0].set()  # one worker free: it takes the jobs one at a time, by priority
    late(), early()
    gates[1].set()
    block()
    assert order == ["first", "queued"]


def test_a_changed_thread_count_ends_the_old_workers_after_their_jobs():
    """The pool is made anew when torch's thread count changes; the old one's workers idled for good, so a loop
    switching between 2 and 3 threads grew by 2–3 threads a call (3, 6, 8, 11, 13, 16)."""
    def workers_alive():
        return sum(t.name.startswith("specscope-worker") for t in threading.enumerate())

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gate = threading.Event()
        held = workers.start(lambda g: g.wait(10) and "done", [gate, gate])  # the old pool busy when it is replaced
        for i in range(6):
            torch.set_num_threads(3 + i % 2)
            assert workers.start(lambda x: x + 1, [i, i])() == [i + 1, i + 1]
        gate.set()
        assert held() == ["done", "done"]  # queued on the old pool: still answered
        deadline = time.monotonic() + 10
        while workers_alive() > 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert workers_alive() == 4
    finally:
        torch.set_num_threads(threads)


def test_a_failing_job_raises_in_the_caller_and_the_pool_goes_on(two_threads):
    def job(x):
        if x == 2:
            raise ValueError("bad item 2")
        return x

    with pytest.raises(ValueError, match="bad item 2"):
        workers.start(job, [1, 2, 3])()
    assert workers.start(job, [4, 5])() == [4, 5]


def test_a_failed_collection_cancels_the_jobs_that_have_not_started(two_threads):
    gates = [threading.Event(), threading.Event()]
    block = workers.start(lambda gate: gate.wait(10), gates)  # both workers held: the next jobs stay queued
    hold, ran = threading.Event(), []

    def job(x):
        if x == 0:
            raise ValueError("bad item 0")
        hold.wait(10)  # item 1 keeps the freed worker busy while the caller sees item 0's error
        ran.append(x)

    wait = workers.start(job, [0, 1, 2, 3])
    gates[0].set()  # one worker free: it fails item 0, then starts item 1
    with pytest.raises(ValueError, match="bad item 0"):
        wait()
    hold.set()
    gates[1].set()
    block()
    while workers.busy(torch.device("cpu")):
        threading.Event().wait(0.01)
    assert ran in ([], [1])  # items 2 and 3 were cancelled before a worker took them (item 1 too, if it had not started)


def test_exit_while_workers_run_is_a_clean_exit(tmp_path):
    """A worker thread still inside torch when the interpreter tears down aborted the process (SIGABRT, status 134):
    exiting, or failing, in the middle of a measured step. At exit the pool now cancels its queue and finishes."""
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text("import sys, torch\n"
                      "torch.set_num_threads(2)\n"
                      "from specscope import linalg as L\n"
                      "wait = L.nuclear_norms_later([torch.randn(600, 600) for _ in range(8)])\n"
                      "sys.exit(3)\n")
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, done.stderr[-2000:]


def test_without_a_pool_jobs_run_in_the_caller_when_collected():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ran = []
        wait = workers.start(ran.append, [1, 2])
        assert ran == []  # nothing runs until collected
        wait()
        assert ran == [1, 2]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pool_min", [1, 10**9])  # the workers' route and the serial one
def test_fro_and_nuclear_norms_started_early_match_float64_svd(monkeypatch, two_threads, pool_min):
    monkeypatch.setattr(norms, "POOL_MIN", pool_min)
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(20, 50, generator=g), torch.randn(40, 12, generator=g),
            torch.randn(30, 3, generator=g) @ torch.randn(3, 30, generator=g), torch.zeros(6, 9)]
    fro, nuc = norms.fro_nuclear_norms_later(mats)()
    ref_fro = torch.stack([torch.linalg.matrix_norm(G.double()) for G in mats])
    ref_nuc = torch.stack([torch.linalg.svdvals(G.double()).sum() for G in mats])
    torch.testing.assert_close(fro, ref_fro, rtol=1e-12, atol=0)
    torch.testing.assert_close(nuc, ref_nuc, rtol=1e-6, atol=1e-6)  # float32 inputs, float64 Grams
    torch.testing.assert_close(L.nuclear_norms(mats), nuc, rtol=1e-12, atol=1e-12)
    bad = [mats[0], torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), mats[1]]
    fro, nuc = norms.fro_nuclear_norms_later(bad)()  # no error: the bad matrix is reported non-finite
    assert not torch.isfinite(fro[1]) and not torch.isfinite(nuc[1])
    torch.testing.assert_close(nuc[[0, 2]], ref_nuc[:2], rtol=1e-6, atol=1e-6)


def _mixed_matrices():
    """Shapes of every kind a step hands over at once: wide, tall, square, a batch, float64, rank-deficient."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(24, 60, generator=g), torch.randn(70, 24, generator=g), torch.randn(3, 30, 30, generator=g),
            torch.randn(40, 4, generator=g) @ torch.randn(4, 50, generator=g),
            torch.randn(33, 35, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g)]


@pytest.mark.parametrize("pool_min", [20, 10**9])  # the workers' route and the calling thread's
def test_polar_started_on_workers_equals_polar_and_svd(monkeypatch, two_threads, pool_min):
    polar_module = importlib.import_module("specscope.linalg.polar")  # the package's `polar` is the function

    monkeypatch.setattr(polar_module, "POOL_MIN", pool_min)
    mats = _mixed_matrices()
    ran = []
    monkeypatch.setattr(polar_module, "_gram_job",
                        lambda *a, **k: ran.append(threading.current_thread().name) or _gram_job(*a, **k))
    Ps = L.polar_later(mats, "gram")()
    pairs = L.polar_with_nuclear_norm_later(mats, "gram")()
    on_workers = sum(name.startswith("specscope-worker") for name in ran)
    assert on_workers == (2 * 5 if pool_min == 20 else 0)  # twice each item whose smaller side reaches POOL_MIN
    for G, P, (P2, nuc) in zip(mats, Ps, pairs):
        assert P.shape == G.shape and P.dtype == G.dtype and P2.dtype == G.dtype
        assert nuc.shape == G.shape[:-2] and nuc.dtype == (torch.float64 if G.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(P, L.polar(G, "svd"), rtol=0, atol=2e-5 if G.dtype == torch.float32 else 1e-10)
        torch.testing.assert_close(P2, P, rtol=0, atol=0)
        torch.testing.assert_close(nuc.double(), torch.linalg.svdvals(G.double()).sum(-1), rtol=1e-6, atol=0)
    batch = torch.randn(2, 3, 30, 40, generator=torch.Generator().manual_seed(8))  # one job per matrix when pooled
    ran.clear()
    P, nuc = L.polar_with_nuclear_norm(batch)
    assert sum(name.startswith("specscope-worker") for name in ran) == (6 if pool_min == 20 else 0)
    torch.testing.assert_close(L.polar(batch, "gram"), P, rtol=0, atol=0)
    torch.testing.assert_close(P, L.polar(batch, "svd"), rtol=0, atol=2e-5)
    torch.testing.assert_close(nuc.double(), torch.linalg.svdvals(batch.double()).sum(-1), rtol=1e-6, atol=0)


_gram_job = importlib.import_module("specscope.linalg.polar")._gram_job


def test_an_input_changed_before_its_result_is_collected_is_refused(monkeypatch, two_threads):
    """The workers read the matrices while the caller goes on: one changed meanwhile (a gradient zeroed, the next
    momentum update) gave a random mix of its old and new values — six norms read [1, 2, 2, 2, 2, 2]× their
    values in one trial. The collection now refuses it, naming the matrix; unchanged inputs collect as before."""
    polar_module = importlib.import_module("specscope.linalg.polar")  # the package's `polar` is the function

    monkeypatch.setattr(polar_module, "POOL_MIN", 1)
    monkeypatch.setattr(norms, "POOL_MIN", 1)
    g = torch.Generator().manual_seed(3)
    for start, name in [(lambda ms: L.polar_later(ms, "gram"), "polar_later"),
                        (lambda ms: L.polar_with_nuclear_norm_later(ms, "gram"), "polar_with_nuclear_norm_later"),
                        (norms.nuclear_norms_later, "nuclear_norms_later"),
                        (norms.fro_nuclear_norms_later, "fro_nuclear_norms_later")]:
        mats = [torch.randn(30, 40, generator=g) for _ in range(3)]
        start(mats)()  # unchanged: collected
        wait = start(mats)
        mats[1].mul_(2.0)
        with pytest.raises(ValueError, match=rf"{name}: mats\[1\] was changed in place after the call"):
            wait()


def test_polar_later_checks_every_item_before_anything_starts(monkeypatch, two_threads):
    polar_module = importlib.import_module("specscope.linalg.polar")  # the package's `polar` is the function

    monkeypatch.setattr(polar_module, "POOL_MIN", 1)
    started = []
    monkeypatch.setattr(workers, "start", lambda *a, **k: started.append(a) or (lambda: []))
    bad = [torch.randn(8, 8), torch.tensor([[1.0, float("nan")], [0.0, 1.0]])]
    with pytest.raises(ValueError, match=r"polar_later: mats\[1\] has 1 NaN"):
        L.polar_later(bad, "gram")
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        L.polar_later([torch.randn(8, 8)], "qr")
    with pytest.raises(ValueError, match="must be 'gram' or 'svd'"):
        L.polar_with_nuclear_norm_later([torch.randn(8, 8)], "newton_schulz")
    assert started == []


def _threads_after_hand_over(release: bool) -> tuple[int, int]:
    """This process's thread count after a 2-thread product (its OpenMP team now idle, spinning by libgomp's
    default) and after a hand-over of two jobs to the workers."""
    workers.RELEASE_OPENMP = release
    x = torch.randn(1024, 1024)
    x @ x
    before = len(os.listdir("/proc/self/task"))
    workers.start(lambda _: time.sleep(0.01), [0, 1])()
    return before, len(os.listdir("/proc/self/task"))


def test_the_openmp_release_follows_the_cpu_and_the_environment(monkeypatch):
    """Measured: ending the team paid on an AMD EPYC and cost a probe's measured step 5–11 ms on an Intel Xeon."""
    monkeypatch.setattr(workers, "RELEASE_OPENMP", None)
    monkeypatch.delenv(workers.RELEASE_ENV, raising=False)
    for vendor, release in (("AuthenticAMD", True), ("GenuineIntel", False), ("", False)):
        monkeypatch.setattr(workers, "cpu_vendor", lambda v=vendor: v)
        assert workers.releases_openmp() is release
        monkeypatch.setenv(workers.RELEASE_ENV, " On ")
        assert workers.releases_openmp() is True
        monkeypatch.setenv(workers.RELEASE_ENV, "off")
        assert workers.releases_openmp() is False
        monkeypatch.setenv(workers.RELEASE_ENV, "")  # set but empty: auto
        assert workers.releases_openmp() is release
        monkeypatch.delenv(workers.RELEASE_ENV)
    monkeypatch.setattr(workers, "RELEASE_OPENMP", True)  # a program's own choice wins over the environment
    monkeypatch.setenv(workers.RELEASE_ENV, "off")
    assert workers.releases_openmp() is True
    monkeypatch.setattr(workers, "RELEASE_OPENMP", None)
    monkeypatch.setenv(workers.RELEASE_ENV, "yes")
    with pytest.raises(ValueError, match=r"SPECSCOPE_OPENMP_RELEASE='yes'.*auto, on, off"):
        workers.releases_openmp()


@pytest.mark.skipif(not os.path.exists("/proc/self/task") or workers._omp_pause() is None,
                    reason="needs Linux /proc and torch's libgomp")
def test_handing_jobs_over_ends_the_callers_idle_openmp_team(two_threads, monkeypatch):
    """With the release the idle team's thread is gone by the time the caller waits, so it cannot spin on a core
    the workers need (libgomp's default spins for milliseconds; timing that spin on a shared machine was flaky);
    without it the team stays."""
    monkeypatch.setattr(workers, "RELEASE_OPENMP", True)  # restored after the test; each call below sets it
    _threads_after_hand_over(False)  # the worker pool's threads exist from here on
    for _ in range(3):
        before, after = _threads_after_hand_over(False)
        assert after == before
        before, after = _threads_after_hand_over(True)
        assert after == before - 1  # the team's one extra thread (two threads: the caller and one more)
    # the caller keeps its thread count and its next parallel region computes as before
    assert torch.get_num_threads() == 2
    x = torch.randn(512, 512, dtype=torch.float64)
    before = x @ x
    workers.release_openmp_threads()
    assert torch.allclose(x @ x, before, rtol=1e-14, atol=0)
    workers.release_openmp_threads()
    workers.release_openmp_threads()  # no team left: nothing to do


@pytest.mark.skipif(not hasattr(os, "fork") or workers._omp_pause() is None, reason="needs fork and torch's libgomp")
def test_a_forked_child_hands_jobs_over_without_waiting_on_its_parents_team(tmp_path):
    """libgomp's record of the parent's team survives a fork without its threads: ending that team in the child
    waited for them forever. The child's hand-over now leaves it alone (its jobs run; a torch parallel region
    would still hang there, as it does without specscope)."""
    import subprocess
    import sys

    script = tmp_path / "fork.py"
    script.write_text("import os, torch\n"
                      "torch.set_num_threads(2)\n"
                      "from specscope.linalg import workers\n"
                      "x = torch.randn(1024, 1024)\n"
                      "x @ x\n"  # the parent's team exists, idle
                      "pid = os.fork()\n"
                      "if pid == 0:\n"
                      "    print(workers.start(lambda v: v + 1, [1, 2])(), flush=True)\n"
                      "    os._exit(0)\n"
                      "os.waitpid(pid, 0)\n")
    env = {**os.environ, workers.RELEASE_ENV: "on"}  # the release asked for on any CPU: the child must skip it
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "[2, 3]" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_python_switches_threads_sooner_while_the_caller_waits_and_only_then(two_threads, monkeypatch):
    """While the caller waits on the workers, Python's switch interval is WAIT_SWITCH (a worker back from LAPACK gets
    the lock within it); the caller's own interval comes back afterwards, also after a failing job, and an interval
    already shorter is left alone."""
    monkeypatch.setattr(workers, "WAIT_SWITCH", 5e-4)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        seen = workers.start(lambda _: (time.sleep(0.02), sys.getswitchinterval())[1], [0, 1])()
        assert seen == pytest.approx([5e-4, 5e-4]) and sys.getswitchinterval() == pytest.approx(0.004)

        def fail(_):
            time.sleep(0.02)
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            workers.start(fail, [0])()
        assert sys.getswitchinterval() == pytest.approx(0.004)

        sys.setswitchinterval(1e-4)
        assert workers.pool(2).map(lambda _: sys.getswitchinterval(), [0, 1]) == pytest.approx([1e-4, 1e-4])
        assert sys.getswitchinterval() == pytest.approx(1e-4)
    finally:
        sys.setswitchinterval(before)


def test_cache_chunks_keep_each_run_within_its_share_of_the_cache():
    """Consecutive runs of indices, in order, each within cache / CACHE_SHARE bytes but never empty (an input bigger
    than the share is a run of its own); no known cache: one run of all, as before the rule."""
    MiB = 2**20
    share = 32 * MiB // workers.CACHE_SHARE  # 2 MiB: the AMD EPYC measured
    assert workers.cache_chunks([2 * MiB] * 3 + [8 * MiB] * 2, cache=32 * MiB) == [[0], [1], [2], [3], [4]]
    assert workers.cache_chunks([MiB // 2] * 5, cache=32 * MiB) == [[0, 1, 2, 3], [4]]
    runs = workers.cache_chunks([MiB, 3 * MiB, MiB // 4, MiB // 4, MiB, MiB], cache=32 * MiB)
    assert [i for r in runs for i in r] == list(range(6)) and all(r for r in runs)
    assert all(sum([MiB, 3 * MiB, MiB // 4, MiB // 4, MiB, MiB][i] for i in r) <= share for r in runs if len(r) > 1)
    assert workers.cache_chunks([2 * MiB] * 3, cache=0) == [[0, 1, 2]]
    assert workers.cache_chunks([], cache=0) == [] and workers.cache_chunks([], cache=32 * MiB) == []
    assert workers.cache_chunks([MiB] * 3, cache=480 * MiB) == [[0, 1, 2]]  # a cache that holds them all: one run


def test_the_last_level_cache_is_the_largest_size_sysfs_lists(tmp_path):
    """Sizes as sysfs writes them ("32K", "1024K", "32768K", a bare byte count), the largest wins; unreadable or
    malformed entries are skipped; no cache folder at all is 0 (one run: the rule before cache_chunks)."""
    from specscope.linalg._cpu import last_level_cache

    for i, size in enumerate(["32K", "32K", "1024K", "32768K", "oops", ""]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    (tmp_path / "index9").mkdir()  # no size file
    assert last_level_cache(str(tmp_path)) == 32 * 2**20
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index0").mkdir()
    (tmp_path / "other" / "index0" / "size").write_text("2M")
    (tmp_path / "other" / "index1").mkdir()
    (tmp_path / "other" / "index1" / "size").write_text("4096")
    assert last_level_cache(str(tmp_path / "other")) == 2 * 2**20
    assert last_level_cache(str(tmp_path / "missing")) == 0
    here = last_level_cache()
    assert isinstance(here, int) and here >= 0
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache/index0"):
        assert here >= 2**15  # at least an L1's 32 KiB
