"""Tucker adapters as a PEFT method (needs the ``[peft]`` extra).

    from tucker_manifold.adapters import TuckerPeftConfig
    import peft

    model = peft.get_peft_model(model, TuckerPeftConfig(target_modules=["query", "value"], init_rank=4))
    model.print_trainable_parameters()
    ...                                  # train with TDLRT / ParallelTDLRT / geoopt / torch.optim
    model.save_pretrained("runs/x")      # adapter_model.safetensors + adapter_config.json (ranks included)
    peft.PeftModel.from_pretrained(base, "runs/x")   # after register_with_peft() in a fresh process
    merged = model.merge_and_unload()

**How it is registered, and why not with ``register_peft_method``.** PEFT 0.21's
``peft.utils.register_peft_method(name=..., config_cls=..., model_cls=...)`` only accepts names that are
already members of the closed ``PeftType`` enum (it checks ``name.upper() in list(PeftType)``), so a package
outside PEFT cannot register through it. PEFT's dispatch, however, only ever uses the type as a key of three
dicts (``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``, ``PEFT_TYPE_TO_PREFIX_MAPPING``), and
``PeftType`` is a ``str`` enum whose members hash and compare as their string values; so
:func:`register_with_peft` tries ``register_peft_method`` first (it will work if PEFT ever adds ``TUCKER``)
and otherwise adds the string key ``"TUCKER"`` to those three dicts, which is what ``register_peft_method``
itself does after its check. Creating a :class:`TuckerPeftConfig` registers (idempotently).

``peft.get_peft_model`` needs a ``PeftConfig``: pass a :class:`TuckerPeftConfig` (the same fields as
:class:`~tucker_manifold.adapters.TuckerAdapterConfig`, plus PEFT's own), e.g.
``TuckerPeftConfig.from_adapter_config(cfg)``. The plain config is not a ``PeftConfig`` so that the core
package never imports peft.

``modules_to_save`` are handled by PEFT's own ``ModulesToSaveWrapper`` here. Checkpoints written by PEFT's
``save_pretrained`` carry each adapter's ranks (``tucker_ranks``), and loading resizes the adapters first, so
they round-trip after ranks changed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .config import TuckerAdapterConfig
from .layer import TuckerAdapterLayer
from .model import make_delta

__all__ = ["PEFT_TYPE", "TuckerPeftConfig", "TuckerPeftTuner", "PeftTuckerLayer", "register_with_peft"]

PEFT_TYPE = "TUCKER"
PREFIX = "tucker_"

try:  # PEFT's per-architecture defaults for target_modules=None (attention projections)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as _DEFAULT_TARGETS
except ImportError:  # pragma: no cover
    _DEFAULT_TARGETS = {}

_ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(TuckerAdapterConfig))


@dataclass
class TuckerPeftConfig(PeftConfig):
    """:class:`~tucker_manifold.adapters.TuckerAdapterConfig` as a ``peft.PeftConfig`` (``peft_type="TUCKER"``).

    ``target_modules=None`` takes PEFT's default attention projections for known transformers architectures.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "module names / regex to adapt"})
    tau: float = field(default=0.1, metadata={"help": "relative truncation tolerance of the rank-adaptive optimizer"})
    init_rank: int = field(default=4, metadata={"help": "initial rank of the adaptive modes"})
    rank_min: int = field(default=1, metadata={"help": "lower rank bound"})
    rank_max: Optional[int] = field(default=None, metadata={"help": "upper rank bound (None: the layer's limit)"})
    alpha: Optional[float] = field(default=None, metadata={"help": "scaling = alpha / init_rank (fixed)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "modules trained in full"})
    conv_spatial: str = field(default="fixed", metadata={"help": "'fixed' or 'adaptive' kernel modes"})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "{name regex: rank_max}"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "never adapted"})
    init_scale: float = field(default=0.0, metadata={"help": "0: zero core (dW = 0 at init)"})
    # Fields PEFT's generic matching code reads.
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "see LoraConfig"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "see LoraConfig"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unsupported; keep None"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.target_parameters:
            raise ValueError("target_parameters is not supported by Tucker adapters; use target_modules")
        if self.target_modules is not None:
            self.adapter_config()  # validate now, with the plain config's messages
        register_with_peft()

    def adapter_config(self) -> TuckerAdapterConfig:
        """The plain :class:`TuckerAdapterConfig` with these fields."""
        kw = {k: getattr(self, k) for k in _ADAPTER_FIELDS}
        if isinstance(kw["target_modules"], set):
            kw["target_modules"] = sorted(kw["target_modules"])
        return TuckerAdapterConfig(**kw)

    @classmethod
    def from_adapter_config(cls, config: TuckerAdapterConfig, **peft_kwargs) -> "TuckerPeftConfig":
        """A ``TuckerPeftConfig`` with ``config``'s fields (``peft_kwargs``: PEFT's own, e.g. ``task_type``)."""
        if not isinstance(config, TuckerAdapterConfig):
            raise ValueError(f"config must be a TuckerAdapterConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **peft_kwargs)


class PeftTuckerLayer(TuckerAdapterLayer, BaseTunerLayer):
    """:class:`TuckerAdapterLayer` with PEFT's tuner-layer mixin (adapter switching, deletion, requires_grad)."""

    adapter_layer_names = ("tucker_delta",)
    other_param_names = ()
    # PEFT semantics: disabling also turns off requires_grad of the adapter weights.
    enable_adapters = BaseTunerLayer.enable_adapters
    set_adapter = BaseTunerLayer.set_adapter


class TuckerPeftTuner(BaseTuner):
    """PEFT tuner that wraps each target in a :class:`PeftTuckerLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = PeftTuckerLayer
    target_module_mapping = _DEFAULT_TARGETS

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        cfg = peft_config.adapter_config()
        if isinstance(target, TuckerAdapterLayer):
            target.add_adapter(adapter_name, make_delta(target.get_base_layer(), cfg, current_key))
            return
        new = PeftTuckerLayer(target, adapter_name, make_delta(target, cfg, current_key))
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


def register_with_peft() -> str:
    """Make ``"TUCKER"`` a PEFT method (idempotent). Returns how: ``"register_peft_method"``,
    ``"mapping"`` (see the module docstring) or ``"already registered"``."""
    from peft import mapping

    current = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE)
    if current is TuckerPeftTuner:
        return "already registered"
    if current is not None:
        raise RuntimeError(f"PEFT already has a different method registered as {PEFT_TYPE!r}: {current!r}")
    try:
        from peft.utils import register_peft_method

        register_peft_method(name=PEFT_TYPE.lower(), config_cls=TuckerPeftConfig, model_cls=TuckerPeftTuner, prefix=PREFIX)
        return "register_peft_method"
    except (ImportError, ValueError):
        pass  # PeftType has no TUCKER member
    if PREFIX in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise RuntimeError(f"PEFT already uses the prefix {PREFIX!r}")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = TuckerPeftConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = TuckerPeftTuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    return "mapping"
