"""CUDA: the same numbers as on the CPU, and host synchronisations that do not grow with the number of weights.

Skipped without a CUDA device; `benchmarks/cuda.sh` runs this file first on a GPU machine.
"""

import warnings

import pytest
import torch

from specscope import linalg
from specscope.models import GPT, GPTConfig
from specscope.optim import Muon, SpecGD
from specscope.probe import Monitor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


MATRICES = {"full 96×160": lambda: torch.randn(96, 160, generator=torch.Generator().manual_seed(0)),
            "tall 300×64": lambda: torch.randn(300, 64, generator=torch.Generator().manual_seed(1)),
            "rank 3 of 128×256": lambda: _low_rank(128, 256, 3, 2)}


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_exact_polar_backends_agree_across_devices(name, method):
    G = MATRICES[name]()
    cpu, cuda = linalg.polar(G, method), linalg.polar(G.cuda(), method).cpu()
    assert torch.allclose(cuda, cpu, atol=1e-5), float((cuda - cpu).abs().max())


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "gram_newton_schulz"])
def test_the_scaled_start_on_cuda_changes_no_bit_and_survives_overflow(method):
    """On CUDA the estimators always start at unit scale (no host read): a power-of-two scale of G changes no bit of
    the estimate, also where ‖G‖_F² overflows float32 (2^100), and a 1e19 gradient steps Muon to finite weights."""
    G = MATRICES["full 96×160"]().cuda()
    at_one = linalg.polar(G, method)
    for k in (100, -60, 20):
        assert torch.equal(linalg.polar(G * 2.0**k, method, eps=0.0 if k < 0 else 1e-7), at_one), k
    p = torch.nn.Parameter(torch.zeros(256, 1024, device="cuda"))
    p.grad = torch.randn(256, 1024, device="cuda") * 1e19
    Muon([p], lr=0.02).step()
    assert torch.isfinite(p).all() and p.abs().max() > 0


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "gram_newton_schulz"])
def test_estimators_are_as_accurate_on_cuda(method):
    # bf16 products round differently on the two devices: compare the error to the exact polar, not the bits
    G = torch.stack([MATRICES["full 96×160"](), _low_rank(96, 160, 3, 3)])
    err_cpu = linalg.polar_error(G, linalg.polar(G, method))
    err_cuda = linalg.polar_error(G, linalg.polar(G.cuda(), method).cpu())
    assert (err_cuda <= err_cpu + 0.02).all(), (err_cpu, err_cuda)


def test_polar_nuclear_norms_replayed_as_a_graph_equal_the_eager_iteration(monkeypatch):
    """A small CUDA batch runs as a captured, replayed CUDA graph: the same numbers as the eager iteration, new
    data on every replay (never the captured call's), and list order kept across shapes."""
    from specscope.linalg import norms
    monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", "on")
    g = torch.Generator().manual_seed(7)
    calls = [[torch.randn(64, 96, generator=g) for _ in range(3)] + [torch.randn(40, 40, generator=g), torch.randn(96, 64, generator=g)]
             for _ in range(3)]
    replayed = [linalg.nuclear_norms([m.cuda() for m in mats], method="polar").cpu() for mats in calls]
    assert norms._POLAR_GRAPHS and all(v is not None for v in norms._POLAR_GRAPHS.values())
    monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", "off")
    eager = [linalg.nuclear_norms([m.cuda() for m in mats], method="polar").cpu() for mats in calls]
    for r, e, mats in zip(replayed, eager, calls):
        torch.testing.assert_close(r, e, rtol=1e-12, atol=0)
        ref = torch.stack([torch.linalg.svdvals(G.double()).sum() for G in mats])
        assert ((r - ref).abs() <= 1e-4 * ref).all()
    assert not torch.equal(replayed[0], replayed[1])


def test_krylov_solves_replayed_as_graphs_equal_the_eager_solves(monkeypatch):
    """The st(A) solve of a stacked CUDA batch runs as two replayed CUDA graphs around its eigh: the same θ, error
    estimate and next block as the eager solve, on new inputs at every call."""
    from specscope.probe import estimators as E
    g = torch.Generator().manual_seed(8)
    calls = []
    for _ in range(3):
        A = torch.randn(3, 400, 96, generator=g) * torch.logspace(0, -2, 96)  # a spread spectrum
        A[:, :, 0] += 5 * torch.randn(3, 400, 1, generator=g)[..., 0]          # and a top direction
        calls.append((A.cuda(), torch.linalg.qr(torch.randn(3, 96, E.BLOCK, generator=g)).Q.cuda()))
    monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", "on")
    replayed = [E.krylov_top(A, V) for A, V in calls]
    assert E._KRYLOV_GRAPHS and all(v is not None for v in E._KRYLOV_GRAPHS.values())
    monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", "off")
    eager = [E.krylov_top(A, V) for A, V in calls]
    for r, e, (A, _) in zip(replayed, eager, calls):
        # the same kernels; should cuBLAS pick others under capture, float32 rounding (≈ 1e-7) is what may differ
        torch.testing.assert_close(r[0], e[0], rtol=1e-6, atol=0)     # θ
        torch.testing.assert_close(r[1], e[1], rtol=0, atol=1e-5)     # the next block, unit columns
        torch.testing.assert_close(r[2], e[2], rtol=0, atol=1e-6)     # the error estimate, 1 % of VERIFIED
        exact = torch.linalg.eigvalsh((A.double().mT @ A.double()))[:, -1]
        assert ((r[0] <= exact * (1 + 1e-5)) & (r[0] >= 0.5 * exact)).all()  # a Ritz value: below λ_max, near it
    assert not torch.equal(replayed[0][0], replayed[1][0])


def test_a_measured_step_records_the_same_with_cuda_graphs(monkeypatch):
    """A Monitor's measured steps on a GPT wide enough for the held-input route (d_model 256): the same st(A) and
    nr(G) with SPECSCOPE_CUDA_GRAPHS on as off (two models of one seed; the attention backward is not bitwise
    deterministic on a GPU, hence 1e-4)."""
    from specscope.linalg import norms
    from specscope.probe import estimators as E
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    got = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("SPECSCOPE_CUDA_GRAPHS", setting)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=256)).cuda()
        mon = Monitor(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        recs = []
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            with mon.step(step):
                logits = model(tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            recs += [r for r in mon.pop_records() if r.metric in ("stable_rank", "nuclear_rank")]
        got[setting] = {(r.step, r.layer, r.metric): r.value for r in recs}
    assert any(v is not None for v in E._KRYLOV_GRAPHS.values()) and any(v is not None for v in norms._POLAR_GRAPHS.values())
    assert got["on"].keys() == got["off"].keys() and len(got["on"]) > 20
    for k, v in got["on"].items():
        assert abs(v - got["off"][k]) <= 1e-4 * abs(got["off"][k]), (k, v, got["off"][k])


def test_nuclear_norms_agree_across_devices():
    """On CUDA `nuclear_norms` takes the matmul-only polar route (no eigensolver): within its 1e-4 bound of
    the CPU's float64 eigenvalues, and the same route on both devices agrees to float64 rounding."""
    mats = [MATRICES[k]() for k in MATRICES] + [torch.randn(512, 300, generator=torch.Generator().manual_seed(4))]
    cpu = linalg.nuclear_norms(mats)
    cuda = linalg.nuclear_norms([m.cuda() for m in mats]).cpu()
    assert ((cuda - cpu).abs() <= 1e-4 * cpu).all(), (cuda - cpu) / cpu
    cpu_polar = linalg.nuclear_norms(mats, method="polar")
    torch.testing.assert_close(cuda, cpu_polar, rtol=1e-9, atol=0)
    eig_cuda = linalg.nuclear_norms([m.cuda() for m in mats], method="eigh").cpu()
    # the rank-3 float32 matrix adds 125 singular values of its rounding noise (~1e-7·σ_1), which two float64
    # eigensolvers resolve only to ~1e-8 of the sum (measured on the CPU: Gram route vs SVD 2.6e-8)
    rtol = torch.tensor([1e-9, 1e-9, 1e-6, 1e-9], dtype=torch.float64)
    assert ((eig_cuda - cpu).abs() <= rtol * cpu).all(), (eig_cuda - cpu) / cpu


def _train(make_opt, device: str, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    # drawn on the CPU and moved: torch.randn(..., device="cuda") draws from the CUDA generator, other numbers
    params = [torch.nn.Parameter(torch.randn(s).to(device)) for s in [(64, 32), (32, 64), (48, 48), (48, 48)]]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("make_opt, atol", [
    (lambda ps: Muon(ps, lr=0.02, polar="gram"), 1e-5),
    (lambda ps: SpecGD(ps, lr=0.1, momentum=0.9), 1e-5),
    (lambda ps: Muon(ps, lr=0.02), 5e-3),   # the default backend runs in bfloat16
], ids=["muon-gram", "specgd", "muon-default"])
def test_optimizer_steps_agree_across_devices(make_opt, atol):
    for a, b in zip(_train(make_opt, "cpu"), _train(make_opt, "cuda")):
        assert torch.allclose(a, b, atol=atol), float((a - b).abs().max())


def _tiny_gpt(n_layer: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=n_layer, n_head=2, d_model=32)).cuda()


def _syncs(fn) -> int:
    """Host synchronisations during fn(), counted by torch's sync debug mode (one warning each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def test_measured_step_syncs_do_not_grow_with_the_number_of_weights():
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0)).cuda()
    counts = {}
    for n_layer in (1, 3):
        model = _tiny_gpt(n_layer)
        mon = Monitor(model)

        def step(k: int) -> None:
            model.zero_grad()
            with mon.step(k):
                logits = model(tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            mon.pop_records()

        step(0)  # first measurement: cold starts and one-time setup
        counts[n_layer] = _syncs(lambda: step(1))
    assert counts[3] == counts[1], counts


def test_muon_step_syncs_do_not_grow_with_the_number_of_weights():
    counts = {}
    for n_layer in (1, 3):
        model = _tiny_gpt(n_layer)
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
        opt = Muon(hidden, lr=0.02)
        for p in hidden:
            p.grad = torch.randn_like(p)
        opt.step()
        counts[n_layer] = _syncs(opt.step)
    assert counts[3] == counts[1], counts
