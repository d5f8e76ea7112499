"""tucker_manifold: Riemannian optimization on fixed multilinear-rank Tucker tensors (geoopt) and
rank-adaptive training of Tucker-factorized layers (TDLRT)."""
from . import flow, tucker
from .manifold import FixedRankTucker
from . import nn

__version__ = "0.1.0"

__all__ = ["FixedRankTucker", "tucker", "flow", "nn", "__version__"]
