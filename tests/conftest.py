"""Fixtures shared across the test folders."""

import signal

import pytest


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """SIGINT's handler as each test found it: code a test runs may leave it changed (Lightning ignores SIGINT after a
    KeyboardInterrupt in fit; a CLI interrupt ignores it for the exit handlers), and a later test of the same worker
    — or the subprocess it starts, which inherits an ignored signal — then never sees its Ctrl-C."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


class EmulatedGraph:
    """What a CUDA graph does with its buffers, on any device: `fn(*static)` recomputed into the tensors the capture
    returned (its outputs; an output that is one of the inputs is left alone)."""

    def __init__(self, fn, static):
        self.fn, self.static = fn, static
        self.out = fn(*static)

    def replay(self):
        for o, n in zip(_tensors(self.out), _tensors(self.fn(*self.static))):
            if o is not n:
                o.copy_(n)


def _tensors(x):
    return [t for item in x for t in _tensors(item)] if isinstance(x, (tuple, list)) else [x]


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """`linalg.graphs.capture` replaced by EmulatedGraph, the replayed routes' caches emptied: the buffers' data
    flow of the CUDA graph routes, tested on a CPU (tests/test_cuda.py runs the real graphs)."""
    from specscope.linalg import graphs, norms
    from specscope.probe import estimators

    def capture(fn, *static):
        g = EmulatedGraph(fn, static)
        return g, g.out

    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(norms, "_POLAR_GRAPHS", {})
    monkeypatch.setattr(estimators, "_KRYLOV_GRAPHS", {})
