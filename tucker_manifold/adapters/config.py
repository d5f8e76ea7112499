"""``TuckerAdapterConfig``: what to adapt and how (a validated dataclass, JSON round-trip).

Module names are matched as PEFT matches them (``peft.tuners.tuners_utils.check_target_module_exists``):

* a **string** is a regular expression that must match the *whole* qualified name (``re.fullmatch``);
* a **list** of names matches a module whose qualified name equals an entry or ends with ``"." + entry``
  (so ``"query"`` matches ``bert.encoder.layer.0.attention.self.query`` but not ``my_query``);
* ``"all-linear"`` matches every ``nn.Linear`` outside ``modules_to_save``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence, Union

__all__ = ["TuckerAdapterConfig", "name_matches", "ALL_LINEAR"]

#: ``target_modules`` shorthand for every ``nn.Linear`` (outside ``modules_to_save``).
ALL_LINEAR = "all-linear"

_CONV_SPATIAL = ("fixed", "adaptive")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name_list(value: Any, name: str, allow_regex: bool) -> Union[list[str], str, None]:
    """Normalize a list-or-regex argument; ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return [value] if value else _raise(f"{name} must not contain empty names, got {value!r}")
        if not value:
            raise ValueError(f"{name} must be a non-empty regex or a list of names, got ''")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{name} is not a valid regular expression ({e}): {value!r}") from e
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of names{' or a regex string' if allow_regex else ''}, got {type(value).__name__}")
    out = []
    for v in value:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must contain non-empty strings, got {v!r}")
        out.append(v)
    return out


def _raise(msg: str):
    raise ValueError(msg)


def name_matches(patterns: Union[Sequence[str], str, None], key: str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches equal names or ``"." + name`` suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith("." + p) for p in patterns)


@dataclasses.dataclass
class TuckerAdapterConfig:
    """Configuration of rank-adaptive Tucker adapters ``W = W0 + scaling * dW``.

    Args:
        target_modules: module names to adapt: a list of names / name suffixes, a full-match regex, or
            ``"all-linear"`` (see the module docstring). Matched modules must be ``nn.Linear`` or
            ``nn.Conv2d`` (``groups=1``).
        tau: relative truncation tolerance the rank-adaptive optimizer uses for these adapters
            (:func:`~tucker_manifold.adapters.param_groups` puts it in their parameter group).
        init_rank: initial rank of each adaptive mode (``nn.Linear``: both modes; ``nn.Conv2d``: the
            channel modes).
        rank_min: lower rank bound of the adaptive modes.
        rank_max: upper rank bound of the adaptive modes; ``None``: as large as each layer allows. A value
            larger than a matched layer allows is an error (exclude the layer or use ``rank_pattern``).
        alpha: scale numerator: ``scaling = alpha / init_rank``, fixed when the adapter is created
            (``None``: ``alpha = init_rank``, i.e. ``scaling = 1``). Unlike LoRA the denominator is the
            *initial* rank and never the current one: ranks change during training, and rescaling with them
            would change the function at every truncation (the optimizer's lift is exact only for a
            fixed scale).
        dropout: dropout probability on the adapter's input (the base layer sees the clean input).
        modules_to_save: names (same matching as a list ``target_modules``) of extra modules to train in
            full, e.g. a new classification head; each is replaced by a wrapper holding a frozen original
            and a trainable deep copy, as PEFT does.
        conv_spatial: ``"fixed"``: the kernel modes of a conv adapter stay at full rank ``(k_h, k_w)``;
            ``"adaptive"``: they start at full rank and may be truncated / regrow like the channel modes.
        rank_pattern: ``{name: rank_max}`` overrides per module (a key is a regex matched against the end of
            the name after a ``.``, PEFT's ``rank_pattern`` rule; the first matching key wins); ``init_rank`` is
            lowered to the override.
        exclude_modules: names (list or full-match regex) never adapted, even if ``target_modules`` matches.
        init_scale: ``0`` (default): the core starts at exactly zero, so ``dW = 0`` and the adapted model
            computes what the base model computes. ``> 0``: a well-conditioned core with
            ``||scaling dW||_F = init_scale ||W0||_F``; geoopt's Riemannian optimizers need this, because
            the Riemannian gradient of a factor involves ``(Mat_i(C) Mat_i(C)^T)^{-1}``, undefined at ``C = 0``.
    """

    target_modules: Union[list[str], str]
    tau: float = 0.1
    init_rank: int = 4
    rank_min: int = 1
    rank_max: Optional[int] = None
    alpha: Optional[float] = None
    dropout: float = 0.0
    modules_to_save: Optional[list[str]] = None
    conv_spatial: str = "fixed"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    exclude_modules: Optional[Union[list[str], str]] = None
    init_scale: float = 0.0

    def __post_init__(self) -> None:
        self.target_modules = _name_list(self.target_modules, "target_modules", allow_regex=True)
        if self.target_modules is None or self.target_modules == []:
            raise ValueError("target_modules must name at least one module (a list of names or a regex string)")
        self.exclude_modules = _name_list(self.exclude_modules, "exclude_modules", allow_regex=True)
        self.modules_to_save = _name_list(self.modules_to_save, "modules_to_save", allow_regex=False)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        self.tau = float(self.tau)
        for name in ("init_rank", "rank_min"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.rank_min > self.init_rank:
            raise ValueError(f"rank_min ({self.rank_min}) must be <= init_rank ({self.init_rank})")
        if self.rank_max is not None:
            if not _is_int(self.rank_max) or self.rank_max < 1:
                raise ValueError(f"rank_max must be an int >= 1 or None, got {self.rank_max!r}")
            if self.rank_max < self.init_rank:
                raise ValueError(f"rank_max ({self.rank_max}) must be >= init_rank ({self.init_rank})")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ValueError(f"alpha must be a finite number > 0 or None, got {self.alpha!r}")
            self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.conv_spatial not in _CONV_SPATIAL:
            raise ValueError(f"conv_spatial must be one of {_CONV_SPATIAL}, got {self.conv_spatial!r}")
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a dict {{name: rank_max}}, got {type(self.rank_pattern).__name__}")
        for k, v in self.rank_pattern.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"rank_pattern keys must be non-empty module names, got {k!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"rank_pattern key {k!r} is not a valid regular expression ({e})") from e
            if not _is_int(v) or v < self.rank_min:
                raise ValueError(f"rank_pattern[{k!r}] must be an int >= rank_min ({self.rank_min}), got {v!r}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) or not math.isfinite(self.init_scale) or self.init_scale < 0:
            raise ValueError(f"init_scale must be a finite number >= 0, got {self.init_scale!r}")
        self.init_scale = float(self.init_scale)

    # ------------------------------------------------------------------ derived
    @property
    def scaling(self) -> float:
        """``alpha / init_rank`` (fixed for the adapter's life, whatever its rank becomes)."""
        return (self.alpha if self.alpha is not None else float(self.init_rank)) / self.init_rank

    def is_target(self, key: str, module_is_linear: bool) -> bool:
        """Whether the module named ``key`` is to be adapted (``exclude_modules`` wins)."""
        if name_matches(self.exclude_modules, key):
            return False
        if self.target_modules == ALL_LINEAR:
            return module_is_linear
        return name_matches(self.target_modules, key)

    def is_saved_module(self, key: str) -> bool:
        """Whether the module named ``key`` is one of ``modules_to_save``."""
        return name_matches(self.modules_to_save, key)

    def rank_max_for(self, key: str) -> Optional[int]:
        """``rank_max`` of the module named ``key`` (a ``rank_pattern`` override if one matches)."""
        for pattern, v in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", key):  # PEFT's get_pattern_key rule
                return v
        return self.rank_max

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        d = dataclasses.asdict(self)
        d["rank_pattern"] = dict(self.rank_pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TuckerAdapterConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a ValueError (a config from another tool)."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known: {sorted(names)}")
        return cls(**d)
