"""The one module-replacement engine behind :func:`~tucker_manifold.nn.tuckerize` and
:func:`~tucker_manifold.nn.factorize_model`: walk a model, select modules, build replacements, put them
in place, and say what was converted and what was skipped, and why.

Selection (:class:`ModuleSelector`), the same for every caller. An entry of ``include`` / ``exclude`` is

* a ``str``: a qualified name as in ``model.named_modules()``; it selects that module and everything
  below it (``"features"`` selects ``features.0``, ``features.3``, ...);
* a compiled ``re.Pattern``: a full match on a qualified name, also selecting everything below
  (``re.compile(r".*\\.q_proj")`` selects every ``q_proj``, whatever its depth);
* a module class: every instance of it.

``exclude`` wins over ``include``. A name or pattern in ``include`` that selects no convertible module,
or in ``exclude`` that selects no module at all, is a ValueError (it is almost always a typo).

Only modules of exactly a supported type are converted (a subclass of ``nn.Conv2d`` may override
``forward``; converting it would silently change the model). A module shared by several parents is
converted once and replaced everywhere; factorized layers are not entered.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .base import FactorizedLayer

__all__ = ["ModuleSelector", "ConversionSummary", "replace_modules", "Selection"]

Selector = Union[str, type, "re.Pattern[str]"]
Selection = Optional[Union[Selector, Iterable[Selector]]]


def _ancestry(qualified: str) -> list[str]:
    """``"a.b.c" -> ["a", "a.b", "a.b.c"]``; the root ``""`` -> ``[""]``."""
    parts = qualified.split(".")
    return [".".join(parts[: k + 1]) for k in range(len(parts))]


class ModuleSelector:
    """Which modules ``include`` / ``exclude`` select (see the module docstring)."""

    def __init__(self, include: Selection = None, exclude: Selection = None):
        self.include = None if include is None else self._split(include, "include")
        self.exclude = None if exclude is None else self._split(exclude, "exclude")

    @staticmethod
    def _split(sel, name: str) -> tuple[list, tuple[type, ...]]:
        if isinstance(sel, (str, type, re.Pattern)):
            sel = [sel]
        names, types = [], []
        for s in sel:
            if isinstance(s, (str, re.Pattern)):
                names.append(s)
            elif isinstance(s, type):
                types.append(s)
            else:
                raise ValueError(f"{name} entries must be qualified module names (str), compiled regular expressions or module classes, got {s!r}")
        return names, tuple(types)

    @staticmethod
    def _name_hits(names: list, qualified: str) -> list:
        anc = _ancestry(qualified)
        return [n for n in names if (n in anc if isinstance(n, str) else any(n.fullmatch(a) for a in anc))]

    @classmethod
    def _selects(cls, sel: tuple[list, tuple[type, ...]], qualified: str, module: nn.Module) -> bool:
        names, types = sel
        return bool(cls._name_hits(names, qualified)) or (bool(types) and isinstance(module, types))

    def included(self, qualified: str, module: nn.Module) -> bool:
        return self.include is None or self._selects(self.include, qualified, module)

    def excluded(self, qualified: str, module: nn.Module) -> bool:
        return self.exclude is not None and self._selects(self.exclude, qualified, module)

    def check_exclude(self, all_names: Iterable[str]) -> None:
        """ValueError for an exclude name / pattern that selects no module of the model."""
        if self.exclude is None:
            return
        all_names = list(all_names)
        for n in self.exclude[0]:
            if not any(self._name_hits([n], q) for q in all_names):
                raise ValueError(f"exclude name {_show(n)} matches no module of the model")


def _show(n) -> str:
    return repr(n.pattern) if isinstance(n, re.Pattern) else repr(n)


@dataclasses.dataclass
class ConversionSummary:
    """What a conversion did: ``converted[name] = "Conv2d -> TuckerConv2d"``, ``skipped[name] = reason``
    (for every layer-like module left as it was: a module with a weight matrix or a factorized layer)."""

    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  converted {n or '<root>'}: {what}" for n, what in self.converted.items()]
        lines += [f"  skipped {n or '<root>'}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def _edges(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """Every (parent, attribute name, qualified name, child) edge, shared modules included; factorized
    layers are not entered."""
    for name, child in module._modules.items():
        if child is None:
            continue
        q = f"{prefix}.{name}" if prefix else name
        yield module, name, q, child
        if not isinstance(child, FactorizedLayer):
            yield from _edges(child, q)


def _layer_like(m: nn.Module) -> bool:
    """Worth a line in the summary: a factorized layer, or a module whose ``weight`` is a matrix or more
    (or not initialised yet). Containers, activations and norms are not."""
    if isinstance(m, FactorizedLayer):
        return True
    w = m._parameters.get("weight")
    return isinstance(w, torch.Tensor) and (nn.parameter.is_lazy(w) or w.dim() >= 2)


def _reason(
    m: nn.Module, parent: Optional[nn.Module], targets: Mapping[type, type], hints: Mapping[type, str]
) -> Optional[str]:
    """Why ``m`` cannot be converted, or None."""
    if isinstance(m, FactorizedLayer):
        return f"already a factorized layer ({type(m).__name__})"
    if nn.parameter.is_lazy(m._parameters.get("weight")):
        return "its weight is not initialised yet (lazy module): run a forward pass first"
    if isinstance(parent, nn.MultiheadAttention):
        # It reads out_proj.weight directly and has fast paths keyed on the type.
        return "inside nn.MultiheadAttention, which reads the weight directly"
    cls = targets.get(type(m))
    if cls is None:
        hint = hints.get(type(m))
        if hint:
            return hint
        base = next((t for t in targets if isinstance(m, t)), None)
        if base is not None:
            return f"{type(m).__name__} is a subclass of nn.{base.__name__} (it may change forward); only exact types are converted"
        return f"unsupported type {type(m).__name__} (supported: {', '.join('nn.' + t.__name__ for t in targets)})"
    try:
        cls._check_dense(m)
    except ValueError as e:
        return str(e)
    return None


def replace_modules(
    model: nn.Module,
    targets: Mapping[type, type],
    build: Callable[[type, nn.Module], nn.Module],
    include: Selection = None,
    exclude: Selection = None,
    hints: Optional[Mapping[type, str]] = None,
) -> tuple[nn.Module, ConversionSummary]:
    """Replace, in place, every selected module of exactly a type in ``targets`` (dense type ->
    :class:`FactorizedLayer` class, whose ``_check_dense`` says whether it can take the module) by
    ``build(layer_class, module)``. ``hints[type]``: the skip reason for a type the caller could convert
    with other options (e.g. ``nn.Linear`` without ``linear=True``).

    Returns ``(root, summary)``: ``root`` is ``model``, or its replacement if ``model`` itself is converted.
    """
    hints = dict(hints or {})
    selector = ModuleSelector(include, exclude)
    edges = [(None, "", "", model)] + list(_edges(model))
    selector.check_exclude(q for _, _, q, _ in edges)

    summary = ConversionSummary()
    chosen: dict[int, type] = {}
    names_hit: set = set()
    for parent, _, q, m in edges:
        if not _layer_like(m) and type(m) not in targets and type(m) not in hints:  # tltorch: weight in a submodule
            continue
        why = _reason(m, parent, targets, hints)
        if why is None and not selector.included(q, m):
            why = "not selected by include"
        elif why is None and selector.include is not None:
            # Counted before exclude, so "include a block, exclude one of its convs" is fine.
            names_hit.update(map(id, selector._name_hits(selector.include[0], q)))
        if why is None and selector.excluded(q, m):
            why = "excluded"
        if why is None:
            chosen[id(m)] = targets[type(m)]
        else:
            summary.skipped[q] = why
    if selector.include is not None:
        missing = [_show(n) for n in selector.include[0] if id(n) not in names_hit]
        if missing:
            supported = ", ".join("nn." + t.__name__ for t in targets)
            extra = "".join(f"; {h}" for h in hints.values())
            raise ValueError(f"include name(s) {', '.join(missing)} match no convertible module ({supported}{extra})")

    new: dict[int, nn.Module] = {}
    root = model
    for parent, attr, q, m in edges:
        if id(m) not in chosen:
            continue
        if id(m) not in new:
            new[id(m)] = build(chosen[id(m)], m)
        summary.converted[q] = f"{type(m).__name__} -> {type(new[id(m)]).__name__}"
        if parent is None:
            root = new[id(m)]
        else:
            setattr(parent, attr, new[id(m)])
    return root, summary
