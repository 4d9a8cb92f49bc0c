"""Rolling SVD of gradient/update windows (spectral edge directions) and gradient-subspace projections."""

from specscope.subspace.coupling import coupling_ratios, directional_coupling
from specscope.subspace.project import GradientProjection, flatten, project, random_basis, unflatten_
from specscope.subspace.rolling import RollingSVD

__all__ = [
    "coupling_ratios",
    "directional_coupling","GradientProjection", "RollingSVD", "flatten", "project", "random_basis", "unflatten_"]
