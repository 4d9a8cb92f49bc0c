"""CUDA graphs for small, launch-bound computations: captured once, replayed after.

On a GPU a batch of small matrices takes microseconds of arithmetic, but every eager torch op costs the host
≈ 20 µs to launch: the probe's measured step on one H100 spent 6.7 ms finishing, ≈ 320 launches, against ≈ 3.5 ms
of device time (README "On a GPU"). A CUDA graph records a computation's kernels once and replays them
all with one launch; it reads its inputs from, and writes its outputs to, buffers of its own, so a replay copies
the new inputs in and the caller clones the outputs out before the next replay overwrites them.

SPECSCOPE_CUDA_GRAPHS ("on" or "off"; unset: off) switches the routes that use this: the polar iteration of
nr(G) (`norms._polar_sums_replayed`) and the st(A) Krylov solves (`probe.estimators._KrylovGraphs`). Off by default
until timed on a GPU: tests/test_cuda.py checks both routes against the eager ones there, and
`benchmarks/probe_overhead.py --device cuda` times them as a row of their own.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from specscope import settings

ENV = "SPECSCOPE_CUDA_GRAPHS"


def enabled() -> bool:
    """SPECSCOPE_CUDA_GRAPHS, checked: "on" or "off" (any case; unset or empty: off)."""
    return settings.read(ENV) == "on"


def capture(fn: Callable[..., Any], *static: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, Any] | None:
    """(graph, fn(*static) as the graph writes it): fn run once on a side stream (cuBLAS's handle and workspace,
    and any device constant fn caches, are made outside the capture), then captured reading `static`. fn must not
    synchronise with the host. None where the capture fails (an op or a platform without graph support): the
    caller runs fn eagerly. Other threads' CUDA calls may go on meanwhile (capture_error_mode "thread_local")."""
    device = static[0].device
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        fn(*static)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn(*static)
    except RuntimeError:
        return None
    return graph, out
