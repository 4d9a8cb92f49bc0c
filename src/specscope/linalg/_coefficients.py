"""Coefficient schedules (a, b, c) of the odd quintic polar iteration X ← aX + (bA + cA²)X, A = XXᵀ."""
from __future__ import annotations

KELLER_COEFFICIENTS = (3.4445, -4.775, 2.0315)

# Degree-5 Polar Express schedule for an initial lower bound ℓ = 1e-3 (arXiv 2505.16932, Algorithm 1).
# Every polynomial but the last is deflated by a 1.01 safety factor, p(x/1.01), so round-off cannot push
# a singular value past the interval the next polynomial was optimised on; the last one is the
# cubically convergent fixed-point map 15/8 x − 10/8 x³ + 3/8 x⁵, repeated for extra steps.
_PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
POLAR_EXPRESS_COEFFICIENTS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]] + [_PE_RAW[-1]]
