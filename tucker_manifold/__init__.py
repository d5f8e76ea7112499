"""tucker_manifold: Riemannian optimization on fixed multilinear-rank Tucker tensors (geoopt) and
rank-adaptive training of Tucker-factorized layers (TDLRT).

``tm.FixedRankTucker`` (the manifold), ``tm.parameter`` (the Tucker-parameter contract between
optimizers and layers), ``tm.optim`` (``TDLRT``), ``tm.nn`` (layers and model conversion),
``tm.flow`` and ``tm.tucker`` (the maths as pure functions), ``tm.layout`` (memory layout of a run)."""
from . import flow, tucker
from .manifold import FixedRankTucker
from . import parameter
from . import nn, optim
from . import layout

__version__ = "0.1.0"

__all__ = ["FixedRankTucker", "tucker", "flow", "parameter", "optim", "nn", "layout", "__version__"]
