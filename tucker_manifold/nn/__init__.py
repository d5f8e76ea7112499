"""Tucker-factorized layers and model conversion.

* :class:`TuckerConv2d`, :class:`TuckerLinear`: one packed ``geoopt.ManifoldParameter`` (``tucker_weight``)
  on a :class:`~tucker_manifold.FixedRankTucker` plus a dense bias; trainable by ``torch.optim``,
  geoopt's Riemannian optimizers or ``tucker_manifold.optim.TDLRT``.
* :func:`tuckerize` converts a model; :func:`compression_rate`, :func:`ranks`, :func:`tucker_parameters`,
  :func:`tucker_layers` inspect one.
* CP / matrix baselines (:class:`CPConv2d`, :class:`MatrixConv2d`, :class:`CPLinear`, :class:`MatrixLinear`,
  :func:`factorize_model`) when ``baselines`` is available.
"""
from .base import FactorizedConv2d, FactorizedLayer, is_conv_layer, is_factorized_layer, parse_conv_args
from ..parameter import TuckerParameter
from .layers import TuckerConv2d, TuckerLayer, TuckerLinear, decaying_core
from .tuckerize import compression_rate, ranks, tucker_layers, tucker_parameters, tuckerize

__all__ = [
    "FactorizedLayer",
    "FactorizedConv2d",
    "is_conv_layer",
    "is_factorized_layer",
    "parse_conv_args",
    "TuckerConv2d",
    "TuckerLinear",
    "TuckerLayer",
    "TuckerParameter",
    "tuckerize",
    "compression_rate",
    "ranks",
    "tucker_parameters",
    "tucker_layers",
    "decaying_core",
]

try:  # written in parallel; the Tucker layers do not depend on it
    from .baselines import CPConv2d, CPLinear, MatrixConv2d, MatrixLinear, factorize_model
except ImportError:  # pragma: no cover
    pass
else:
    __all__ += ["CPConv2d", "MatrixConv2d", "CPLinear", "MatrixLinear", "factorize_model"]
