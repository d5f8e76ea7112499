"""Rank-adaptive Tucker adapters for fine-tuning pretrained models (PEFT-shaped API).

    from tucker_manifold import adapters
    from tucker_manifold.optim import TDLRT

    cfg = adapters.TuckerAdapterConfig(target_modules=["query", "value"], tau=0.1, init_rank=4, rank_max=16,
                                       modules_to_save=["classifier"])
    model = adapters.add_adapters(model, cfg)          # base frozen; outputs unchanged (dW = 0)
    print(adapters.trainable_parameters(model))        # trainable params: ... || all params: ... || trainable%: ...
    opt = TDLRT(adapters.param_groups(model), lr=1e-3, method="adam")
    ...                                                 # opt.step(closure): ranks adapt per layer
    adapters.save_adapters(model, "runs/adapter")      # safetensors + JSON, ranks included
    plain = adapters.merge_and_unload(model)           # nn.Linear / nn.Conv2d with W0 + dW

``nn.Linear`` layers get an order-2 Tucker update, ``nn.Conv2d`` layers a 4-way one ``(out, in, kh, kw)``
(never flattened into a matrix). The update is one :class:`~tucker_manifold.parameter.TuckerParameter`, so
TDLRT / ParallelTDLRT, geoopt's Riemannian optimizers and ``torch.optim`` all train it.

With peft installed, :func:`register_with_peft` (or importing :mod:`.peft_integration`) makes
``peft.get_peft_model(model, TuckerPeftConfig(...))`` work; ``TuckerPeftConfig`` is importable from here
(lazily: importing this package never imports peft or transformers).
"""
from .config import ALL_LINEAR, TuckerAdapterConfig
from .io import load_adapters, save_adapters
from .layer import TuckerAdapterConv2d, TuckerAdapterLayer, TuckerAdapterLinear, TuckerDelta
from .model import (
    ParameterCount,
    TrainableCopy,
    adapter_layers,
    adapter_parameters,
    adapter_ranks,
    add_adapters,
    disabled_adapters,
    merge,
    merge_and_unload,
    param_groups,
    trainable_parameters,
    unload,
    unmerge,
)

__all__ = [
    "ALL_LINEAR",
    "TuckerAdapterConfig",
    "TuckerDelta",
    "TuckerAdapterLayer",
    "TuckerAdapterLinear",
    "TuckerAdapterConv2d",
    "TrainableCopy",
    "ParameterCount",
    "add_adapters",
    "adapter_layers",
    "adapter_parameters",
    "adapter_ranks",
    "param_groups",
    "trainable_parameters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "disabled_adapters",
    "save_adapters",
    "load_adapters",
    "register_with_peft",
    "TuckerPeftConfig",
]

_PEFT_NAMES = ("register_with_peft", "TuckerPeftConfig", "TuckerPeftTuner", "PeftTuckerLayer")


def __getattr__(name):
    if name in _PEFT_NAMES:
        from . import peft_integration

        return getattr(peft_integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
