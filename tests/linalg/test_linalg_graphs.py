"""linalg.graphs: the SPECSCOPE_CUDA_GRAPHS switch, and the replayed polar route's buffers with a stand-in for a
CUDA graph that replays by running the captured function again into the same output tensors (`emulated_cuda_graphs`
in tests/conftest.py; tests/test_cuda.py checks the real graphs on a GPU)."""

import pytest
import torch

from specscope.linalg import graphs, norms


def test_the_switch_is_checked(monkeypatch):
    """SPECSCOPE_CUDA_GRAPHS: on/off (any case, unset = off); anything else names the variable and its values."""
    for value, want in (("on", True), ("OFF", False), ("", False)):
        monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", value)
        assert graphs.enabled() is want
    monkeypatch.delenv("SPECSCOPE_CUDA_GRAPHS")
    assert graphs.enabled() is False
    monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="SPECSCOPE_CUDA_GRAPHS='yes': must be on or off"):
        graphs.enabled()


def test_replayed_polar_sums_take_new_inputs_and_hand_out_copies(emulated_cuda_graphs):
    """Each call's result is its own input's (copied into the graph's buffer), and a result held from an earlier
    call is not overwritten by a later replay."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 12, 30, generator=g) for _ in range(3)]
    got = [norms._polar_sums_replayed(S, 12, 1e-4) for S in batches]
    assert len(norms._POLAR_GRAPHS) == 1
    for S, r in zip(batches, got):
        torch.testing.assert_close(r, norms._polar_sums(S.double(), 12, 1e-4), rtol=1e-12, atol=0)


def test_a_failed_capture_falls_back_to_the_eager_iteration(monkeypatch):
    monkeypatch.setattr(graphs, "capture", lambda fn, *static: None)
    monkeypatch.setattr(norms, "_POLAR_GRAPHS", {})
    S = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(norms._polar_sums_replayed(S, 8, 1e-4), norms._polar_sums(S.double(), 8, 1e-4))
    assert list(norms._POLAR_GRAPHS.values()) == [None]
