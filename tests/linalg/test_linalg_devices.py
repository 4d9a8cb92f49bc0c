"""The polar iterations' default dtype per device (linalg.iteration_dtype): bfloat16 where the device multiplies it in
hardware, float32 elsewhere, SPECSCOPE_ITERATION_DTYPE to fix it — and that the kernels, `polar` and Muon's default
step compute in it."""

import pytest
import torch

from specscope import linalg
from specscope.linalg import _cpu, devices
from specscope.optim import Muon


@pytest.fixture
def cpu_units(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) bfloat16 units."""
    def pretend(has: bool) -> None:
        monkeypatch.setattr(_cpu, "bfloat16_units", lambda: has)
        devices._multiplies_bfloat16.cache_clear()
    monkeypatch.delenv(devices.ENV, raising=False)
    yield pretend
    devices._multiplies_bfloat16.cache_clear()


def wide(seed: int = 0, m: int = 48, n: int = 160) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    return (U * torch.logspace(0, -3, m)) @ V.T


def muon_direction(G: torch.Tensor) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(G))
    p.grad = G.clone()
    Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False).step()
    return -p.detach()  # wide: no shape factor


@pytest.mark.parametrize("has, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_default_follows_the_cpus_bfloat16_units(cpu_units, has, expected):
    """Without bfloat16 units (an Intel Xeon of the Ice Lake generation) a bfloat16 product runs through float32 and
    is 3× slower than a float32 one: the iterations then compute in float32, and Muon's default step with them."""
    cpu_units(has)
    G = wide()
    assert linalg.iteration_dtype("cpu") == linalg.iteration_dtype(torch.device("cpu")) == expected
    assert linalg.gram_newton_schulz(G).dtype == expected
    assert linalg.polar_express(G).dtype == expected
    assert torch.equal(linalg.polar(G), linalg.gram_newton_schulz(G, dtype=expected).float())
    torch.testing.assert_close(muon_direction(G), linalg.gram_newton_schulz(G, dtype=expected).float(), rtol=0, atol=1e-6)
    assert linalg.newton_schulz(G).dtype == torch.bfloat16  # torch.optim.Muon's map keeps torch's dtype everywhere


def test_float32_iterations_are_the_more_accurate(cpu_units):
    """On a 128×512 gradient (iterated on its Gram) float32 leaves a quarter of bfloat16's error at 0.1·σ_1 (0.0022
    against 0.0099: what is left is the polynomial's own)."""
    G, errors = wide(0, 128, 512), {}
    for has in (True, False):
        cpu_units(has)
        errors[has] = float(linalg.polar_error(G, muon_direction(G), 0.1))
    assert errors[False] < 0.5 * errors[True] < 0.05


@pytest.mark.parametrize("value, expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32), (" Float32 ", torch.float32)])
@pytest.mark.parametrize("has", [True, False])
def test_the_environment_fixes_the_dtype_on_every_device(cpu_units, monkeypatch, value, expected, has):
    cpu_units(has)
    monkeypatch.setenv(devices.ENV, value)
    assert linalg.iteration_dtype("cpu") == expected
    assert linalg.gram_newton_schulz(wide()).dtype == expected
    monkeypatch.setenv(devices.ENV, "auto")
    assert linalg.iteration_dtype("cpu") == (torch.bfloat16 if has else torch.float32)


def test_an_unknown_setting_is_one_clear_error(cpu_units, monkeypatch):
    monkeypatch.setenv(devices.ENV, "fp8")
    with pytest.raises(ValueError, match=r"SPECSCOPE_ITERATION_DTYPE='fp8': must be one of auto, bfloat16, float32"):
        linalg.iteration_dtype("cpu")
    with pytest.raises(ValueError, match="SPECSCOPE_ITERATION_DTYPE"):
        muon_direction(wide())


def test_gpus_from_compute_capability_8_multiply_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for major, expected in ((7, False), (8, True), (9, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, major=major: (major, 0))
        devices._multiplies_bfloat16.cache_clear()
        assert devices._multiplies_bfloat16("cuda", 0) is expected
    devices._multiplies_bfloat16.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a CUDA device")
def test_cuda_without_a_cuda_device_is_a_value_error_not_torchs_assertion():
    devices._multiplies_bfloat16.cache_clear()
    with pytest.raises(ValueError, match=r"iteration_dtype\('cuda'\): this torch has no CUDA device"):
        linalg.iteration_dtype("cuda")


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # Ice Lake: AVX-512, no BF16
    ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n", True),  # Cooper Lake, Zen 4
    ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),  # Arm without BF16
    ("", False),
])
def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path, text, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    (tmp_path / "cpuinfo").write_text(text)
    assert _cpu.bfloat16_units.__wrapped__(str(tmp_path / "cpuinfo")) is expected
    assert _cpu.bfloat16_units.__wrapped__(str(tmp_path / "missing")) is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert _cpu.bfloat16_units.__wrapped__(str(tmp_path / "missing")) is True
