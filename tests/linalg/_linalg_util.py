"""Test matrices with a known spectrum (shared by the linalg tests)."""
import torch


def random_matrix(seed: int, m: int, n: int, rank: int | None = None, batch: tuple = (), decay: float = 0.0,
                  dtype=torch.float64) -> torch.Tensor:
    """U diag(s) Vᵀ with Haar U, V, s_i = exp(−decay·i) on the first `rank` entries (0 after)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) * (0.5 + torch.rand(k, generator=g, dtype=torch.float64))
    if rank is not None:
        s[rank:] = 0
    return ((U * s) @ V.mT).to(dtype)
