"""Rolling SVD of gradient/update windows (spectral edge directions) and gradient-subspace projections."""

from specscope.subspace.coupling import coupling_ratios, directional_coupling
from specscope.subspace.project import GradientProjection, flatten, project, random_basis, unflatten_
from specscope.subspace.rolling import RollingSVD
from specscope.subspace.snapshots import GatedProjection, SEDTracker

__all__ = [
    "GatedProjection", "GradientProjection", "RollingSVD", "SEDTracker", "coupling_ratios", "directional_coupling",
    "flatten", "project", "random_basis", "unflatten_",
]
