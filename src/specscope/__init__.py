"""specscope: the spectral structure of training.

Layers (imports point down only):
cli > labs > train > report > store > optim > probe > subspace > linalg
`specscope.records` holds the plain data types that cross layers (Record, Claim).
"""

__version__ = "0.1.0"
