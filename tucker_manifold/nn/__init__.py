"""Factorized layers and model conversion.

* :class:`FactorizedLayer` (:mod:`.base`): the base of every factorized layer (``weight``, ``shape``,
  ``ranks``, parameter counts, ``from_dense``, ``is_conv``); :func:`is_conv_layer`, :func:`parse_conv_args`.
* :class:`TuckerConv2d`, :class:`TuckerLinear`: one packed Tucker parameter (``tucker_weight``, see
  :mod:`tucker_manifold.parameter`) plus a dense bias; trainable by ``torch.optim``, geoopt's Riemannian
  optimizers or ``tucker_manifold.optim.TDLRT``.
* :class:`TuckerConv1d`, :class:`TuckerConv3d` (:mod:`.conv_nd`): the same layer in 1-D / 3-D.
* CP / matrix baselines: :class:`CPConv2d`, :class:`MatrixConv2d`, :class:`CPLinear`, :class:`MatrixLinear`;
  tensor train (:mod:`.tt`): :class:`TTConv2d`, :class:`TTLinear`, :func:`tt_factorize_model`.
* :func:`tuckerize` and :func:`factorize_model` convert a model through one engine
  (:func:`replace_modules`, :class:`ModuleSelector`, :class:`ConversionSummary`);
  :func:`compression_rate`, :func:`ranks`, :func:`tucker_parameters`, :func:`tucker_layers` inspect one.
"""
from ..parameter import TuckerParameter
from .base import FactorizedConv2d, FactorizedLayer, FactorizedLinear, is_conv_layer, is_factorized_layer, parse_conv_args
from .baselines import CPConv2d, CPLinear, MatrixConv2d, MatrixLinear, factorize_model, rank_for_parameter_budget
from .conv_nd import TuckerConv1d, TuckerConv3d
from .layers import TuckerConv2d, TuckerLayer, TuckerLinear, decaying_core
from .replace import ConversionSummary, ModuleSelector, replace_modules
from .tt import TTConv2d, TTLinear, tt_factorize_model, tt_rank_for_parameter_budget
from .tuckerize import compression_rate, ranks, tucker_layers, tucker_parameters, tuckerize

__all__ = [
    "FactorizedLayer",
    "FactorizedConv2d",
    "FactorizedLinear",
    "is_conv_layer",
    "is_factorized_layer",
    "parse_conv_args",
    "TuckerConv2d",
    "TuckerLinear",
    "TuckerConv1d",
    "TuckerConv3d",
    "TuckerLayer",
    "TuckerParameter",
    "CPConv2d",
    "MatrixConv2d",
    "CPLinear",
    "MatrixLinear",
    "TTConv2d",
    "TTLinear",
    "tt_factorize_model",
    "tt_rank_for_parameter_budget",
    "tuckerize",
    "factorize_model",
    "rank_for_parameter_budget",
    "replace_modules",
    "ModuleSelector",
    "ConversionSummary",
    "compression_rate",
    "ranks",
    "tucker_parameters",
    "tucker_layers",
    "decaying_core",
]
