"""The method registry: a method's name -> how to turn a freshly built dense model into the model and
optimizer of that method, and how ``compare`` matches it to a reference's compression.

Built in: ``dense``, ``tdlrt`` (one pass per step; ``tdlrt-twopass`` the two-pass reference), ``tdlrt-parallel``,
``vanilla-tucker``, ``riemannian-fixed``, ``cp``, ``matrix``, ``tt``
(tensor-train convs) and the pruning baselines ``snip``, ``grasp``, ``imp`` (:mod:`tucker_manifold.pruning`).

Adding a method is one call (a decorator here)::

    from tucker_manifold.experiments.methods import BuildOptions, match_rank_fraction, register_method, sgd
    from tucker_manifold.nn import tuckerize

    @register_method("my-tucker", description="Tucker layers, plain SGD", match=match_rank_fraction)
    def build_my_tucker(model, o: BuildOptions):
        model = tuckerize(model, **o.rank_kwargs(default_fraction=0.25), init=o.init, linear=o.linear)
        return model, sgd(model, o)

``build(model, options)`` receives the dense model already on the run's device and a
:class:`BuildOptions` (tau, ranks, lr, momentum, ...), and returns ``(model, optimizer)``. ``adaptive=True``
marks a method whose ranks follow ``tau`` (``compare`` runs it once per tau and seed); ``match(dense_model,
counts, name)`` returns ``(config overrides, description)`` that bring the method to the reference's
per-layer conv weight counts ``counts`` (``compare`` runs it once per tau and seed, matched; without a
reference, once per seed at its own ranks); a method with neither runs once per seed.
Two optional hooks give a method data and training control:

* ``prepare(model, batch, options)`` runs after ``build``, before training, on one batch
  ``(inputs, targets)`` (the runner draws ``10 x num_classes`` training images with a generator seeded
  by the run's seed, so the loader's shuffling is untouched); it changes ``model`` in place (SNIP and
  GraSP prune here). ``build_method`` then needs ``batch=``.
* ``drive(model, run_epochs, cfg)`` replaces the runner's single call of the training loop:
  ``run_epochs(start_epoch, n_epochs)`` trains ``n_epochs`` more epochs through the same loop, with a
  fresh optimizer of the built one's class and defaults, the learning-rate schedule at positions
  ``[start_epoch, start_epoch + n_epochs)`` of ``cfg.epochs``, and appends to the run's history (IMP
  trains, prunes and rewinds here). ``drive`` must spend exactly ``cfg.epochs`` epochs; such runs
  cannot be resumed from a checkpoint.

After registration the name works everywhere: ``build_method``, ``TrainConfig.method``,
``compare_methods`` and the CLI's ``--method`` / ``--methods`` (they read :func:`method_names`).
Register methods at import of this module (the bottom of this file, or a module imported there), so
that every entry point sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .accounting import match_budget_ranks, match_tucker_rank_fraction
from .config import DEFAULTS, check_rank, check_rank_fraction, check_sparsity, check_tau, resolve_device

__all__ = [
    "BuildOptions",
    "Method",
    "register_method",
    "get_method",
    "method_names",
    "build_method",
    "sgd",
    "match_rank_fraction",
    "match_layer_budgets",
    "DEFAULT_TDLRT_RANK_FRACTION",
    "DEFAULT_FIXED_RANK_FRACTION",
    "DEFAULT_SPARSITY",
    "match_tt_budgets",
    "match_sparsity",
    "imp_plan",
]

#: TDLRT's initial channel-rank fraction when neither ``rank`` nor ``rank_fraction`` is given.
DEFAULT_TDLRT_RANK_FRACTION = 0.5
#: Rank fraction of the fixed-rank baselines run at their own ranks.
DEFAULT_FIXED_RANK_FRACTION = 0.25
#: Conv weight sparsity of the pruning methods run without a reference to match.
DEFAULT_SPARSITY = 0.9


@dataclass(frozen=True)
class BuildOptions:
    """The arguments of :func:`build_method`, validated, as a builder receives them."""

    tau: float = DEFAULTS.tau
    rank: Optional[int] = None
    rank_fraction: Optional[float] = None
    layer_ranks: Optional[dict[str, Any]] = None
    lr: float = DEFAULTS.lr
    momentum: float = DEFAULTS.momentum
    weight_decay: float = DEFAULTS.weight_decay
    init: str = DEFAULTS.init
    linear: bool = False
    rank_max: Optional[int] = None
    sparsity: Optional[float] = None  # pruning methods: fraction of conv weights at zero
    budget: Optional[int] = None  # TDLRT methods (experiments/budgets.py): the parameter budget N, resolved
    budget_schedule: Optional[tuple[int, int]] = None  # and its (start_step, end_step)

    def rank_kwargs(self, default_fraction: float) -> dict:
        """``{"ranks": rank}`` or ``{"rank_fraction": ...}`` (``default_fraction`` when neither is set),
        as ``tuckerize`` takes them."""
        if self.rank is not None:
            return {"ranks": self.rank}
        return {"rank_fraction": self.rank_fraction if self.rank_fraction is not None else default_fraction}


Builder = Callable[[nn.Module, BuildOptions], "tuple[nn.Module, torch.optim.Optimizer]"]
#: ``match(dense_model, counts, method name) -> (config overrides, description)``
Matcher = Callable[[nn.Module, "dict[str, int]", str], "tuple[dict, str]"]
#: ``prepare(model, batch, options)``: in place, after ``build`` (see the module docstring)
Preparer = Callable[[nn.Module, "tuple[torch.Tensor, torch.Tensor]", BuildOptions], None]
#: ``drive(model, run_epochs, cfg)``: the method's own training (see the module docstring)
Driver = Callable[[nn.Module, Callable[[int, int], list], Any], Any]


@dataclass(frozen=True)
class Method:
    """A registered method (see the module docstring)."""

    name: str
    build: Builder
    description: str = ""
    adaptive: bool = False
    match: Optional[Matcher] = None
    prepare: Optional[Preparer] = None
    drive: Optional[Driver] = None


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str,
    build: Optional[Builder] = None,
    *,
    description: str = "",
    adaptive: bool = False,
    match: Optional[Matcher] = None,
    replace_existing: bool = False,
    prepare: Optional[Preparer] = None,
    drive: Optional[Driver] = None,
):
    """Register ``build`` under ``name``; usable as a decorator (``build`` omitted). Returns ``build``.
    A name already registered is a ValueError unless ``replace_existing``."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or "," in name:
        raise ValueError(f"name must be a non-empty lower-case string without commas, got {name!r}")

    def add(fn: Builder) -> Builder:
        if not callable(fn):
            raise ValueError(f"build must be callable, got {fn!r}")
        if name in _REGISTRY and not replace_existing:
            raise ValueError(f"method {name!r} is already registered (pass replace_existing=True to replace it)")
        for hook, v in (("prepare", prepare), ("drive", drive)):
            if v is not None and not callable(v):
                raise ValueError(f"{hook} must be callable, got {v!r}")
        _REGISTRY[name] = Method(name, fn, description, adaptive, match, prepare, drive)
        return fn

    return add if build is None else add(build)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the valid names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def _check_layer_ranks(model: nn.Module, layer_ranks: Optional[dict]) -> Optional[dict]:
    if layer_ranks is None:
        return None
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(layer_ranks) - names)
    if unknown:
        raise ValueError(f"layer_ranks names not found in the model: {unknown}")
    # ranks saved as JSON come back as lists: Tucker ranks are tuples
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in layer_ranks.items()}


def build_method(
    model: nn.Module,
    method: str,
    *,
    tau: float = DEFAULTS.tau,
    rank: Optional[int] = None,
    rank_fraction: Optional[float] = None,
    layer_ranks: Optional[dict[str, Any]] = None,
    lr: float = DEFAULTS.lr,
    momentum: float = DEFAULTS.momentum,
    weight_decay: float = DEFAULTS.weight_decay,
    init: str = DEFAULTS.init,
    linear: bool = False,
    rank_max: Optional[int] = None,
    device: str | torch.device | None = None,
    sparsity: Optional[float] = None,
    batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    budget: Optional[float] = None,
    budget_schedule: Optional[tuple[int, int]] = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Factorize a freshly built dense ``model`` for ``method`` and build its optimizer.

    ``rank`` / ``rank_fraction``: the channel ranks (initial ones for TDLRT; default: the method's own).
    ``layer_ranks`` (``{qualified conv name: rank}``) overrides them per layer: an int for CP / matrix
    layers, an int or a 4-tuple for Tucker layers; the layers not named stay dense. ``init``: ``"hosvd"``
    decomposes the dense initialisation (SVD for CP / matrix), ``"random"`` draws the layer afresh.
    ``linear``: also factorize ``nn.Linear`` layers. ``device``: where the model is moved first.
    ``sparsity``: pruning methods' fraction of conv weights at zero (default :data:`DEFAULT_SPARSITY`).
    ``batch``: ``(inputs, targets)`` for a method with a ``prepare`` hook (SNIP, GraSP score on it).
    ``budget``: parameter budget of the methods that take one (``tdlrt``, ``tdlrt-budget``): an int count
    or a float fraction of the dense conv weights (:mod:`.budgets`); ``budget_schedule``: its
    ``(start_step, end_step)`` (``TDLRT(budget_schedule=...)``).
    Returns ``(model, optimizer)``; every parameter of the model is in the optimizer.
    """
    spec = get_method(method)
    if budget is not None:
        from .budgets import resolve_budget, takes_budget

        if not takes_budget(method):
            raise ValueError(f"method {method!r} does not take a budget: fit its ranks to one with "
                             "experiments.budgets.fit_to_budget (what train / compare --budget do)")
        budget = resolve_budget(model, budget)  # the model is still dense here
    if budget_schedule is not None and budget is None:
        raise ValueError("budget_schedule needs budget")
    check_tau(tau)
    check_rank(rank)
    check_rank_fraction(rank_fraction)
    if rank is not None and rank_fraction is not None:
        raise ValueError("give at most one of rank and rank_fraction")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if init not in ("hosvd", "random"):
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")
    check_sparsity(sparsity)
    if spec.prepare is not None and batch is None:
        raise ValueError(f"method {method!r} scores the model on data: pass batch=(inputs, targets)")
    if device is not None:
        model = model.to(resolve_device(device))
    opts = BuildOptions(tau=float(tau), rank=rank, rank_fraction=rank_fraction,
                        layer_ranks=_check_layer_ranks(model, layer_ranks), lr=float(lr), momentum=float(momentum),
                        weight_decay=float(weight_decay), init=init, linear=linear, rank_max=rank_max,
                        sparsity=None if sparsity is None else float(sparsity), budget=budget,
                        budget_schedule=None if budget_schedule is None else tuple(budget_schedule))
    model, opt = spec.build(model, opts)
    if spec.prepare is not None:
        dev = next(model.parameters()).device
        spec.prepare(model, tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in batch), opts)
    return model, opt


# ------------------------------------------------------------------------------------ builder helpers
def sgd(model: nn.Module, o: BuildOptions) -> torch.optim.SGD:
    """``torch.optim.SGD`` over every parameter with the options' lr, momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _tuckerized(model: nn.Module, o: BuildOptions, default_fraction: float) -> nn.Module:
    from ..nn.tuckerize import tuckerize

    kw = dict(init=o.init, linear=o.linear, rank_max=o.rank_max)
    if o.layer_ranks is None:
        return tuckerize(model, **o.rank_kwargs(default_fraction), **kw)
    for name, r in o.layer_ranks.items():
        model = tuckerize(model, ranks=r, include=[name], **kw)
    return model


def _factorized(model: nn.Module, o: BuildOptions, kind: str) -> nn.Module:
    from ..nn.baselines import factorize_model

    init = "svd" if o.init == "hosvd" else "random"
    if o.layer_ranks is None:
        kw = o.rank_kwargs(DEFAULT_FIXED_RANK_FRACTION)
        return factorize_model(model, kind, rank=kw.get("ranks"), rank_fraction=kw.get("rank_fraction"),
                               include_linear=o.linear, init=init)
    for name, r in o.layer_ranks.items():  # each named layer gets its own rank
        model = factorize_model(model, kind, rank=int(r), include_linear=o.linear, include=[name], init=init)
    return model


def match_rank_fraction(dense_model: nn.Module, counts: dict[str, int], method: str) -> tuple[dict, str]:
    """Matcher of the fixed-rank Tucker methods: the one ``rank_fraction`` whose total Tucker conv
    weight count is closest to the reference's."""
    f = match_tucker_rank_fraction(dense_model, sum(counts.values()))
    return {"rank": None, "rank_fraction": f, "layer_ranks": None}, f"rank_fraction={f:.3f}"


def match_layer_budgets(dense_model: nn.Module, counts: dict[str, int], method: str) -> tuple[dict, str]:
    """Matcher of the CP / matrix methods: per layer, the largest rank within the reference's count."""
    ranks = match_budget_ranks(dense_model, method, counts)
    return {"rank": None, "rank_fraction": None, "layer_ranks": ranks}, "per-layer ranks"


# ------------------------------------------------------------------------------------ built-in methods
@register_method("dense", description="the model unchanged, torch.optim.SGD")
def _build_dense(model, o):
    return model, sgd(model, o)


@register_method("tdlrt", adaptive=True,
                 description="tuckerize (initial rank_fraction 0.5), TDLRT with tau and SGD-momentum")
def _build_tdlrt(model, o):
    from ..optim import TDLRT

    model = _tuckerized(model, o, DEFAULT_TDLRT_RANK_FRACTION)
    return model, TDLRT(model.parameters(), lr=o.lr, tau=o.tau, momentum=o.momentum, weight_decay=o.weight_decay,
                        budget=o.budget, budget_schedule=o.budget_schedule)


@register_method("tdlrt-twopass", adaptive=True,
                 description="tdlrt with the two-pass reference step (two gradient evaluations per step)")
def _build_tdlrt_twopass(model, o):
    from ..optim import TDLRT

    model = _tuckerized(model, o, DEFAULT_TDLRT_RANK_FRACTION)
    return model, TDLRT(model.parameters(), lr=o.lr, tau=o.tau, momentum=o.momentum, weight_decay=o.weight_decay,
                        single_pass=False)


@register_method("tdlrt-parallel", adaptive=True,
                 description="tuckerize (initial rank_fraction 0.5), ParallelTDLRT (Riemannian step) with tau and SGD-momentum")
def _build_tdlrt_parallel(model, o):
    from ..optim import ParallelTDLRT

    model = _tuckerized(model, o, DEFAULT_TDLRT_RANK_FRACTION)
    return model, ParallelTDLRT(model.parameters(), lr=o.lr, tau=o.tau, momentum=o.momentum,
                                weight_decay=o.weight_decay)


@register_method("vanilla-tucker", match=match_rank_fraction,
                 description="tuckerize at fixed ranks, plain SGD on core and factors (geometry ignored)")
def _build_vanilla(model, o):
    model = _tuckerized(model, o, DEFAULT_FIXED_RANK_FRACTION)
    return model, sgd(model, o)


@register_method("riemannian-fixed", match=match_rank_fraction,
                 description="tuckerize at fixed ranks, geoopt.optim.RiemannianSGD")
def _build_riemannian(model, o):
    import geoopt

    model = _tuckerized(model, o, DEFAULT_FIXED_RANK_FRACTION)
    return model, geoopt.optim.RiemannianSGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                             weight_decay=o.weight_decay)


@register_method("cp", match=match_layer_budgets, description="CP-factorized convs, torch.optim.SGD")
def _build_cp(model, o):
    model = _factorized(model, o, "cp")
    return model, sgd(model, o)


@register_method("matrix", match=match_layer_budgets, description="matrix (SVD) factorized convs, torch.optim.SGD")
def _build_matrix(model, o):
    model = _factorized(model, o, "matrix")
    return model, sgd(model, o)


# ------------------------------------------------------------------------------------ tensor train
def match_tt_budgets(dense_model: nn.Module, counts: dict[str, int], method: str) -> tuple[dict, str]:
    """Matcher of ``tt``: per layer, the largest uniform TT-rank within the reference's weight count
    (:func:`tucker_manifold.nn.tt.tt_rank_for_parameter_budget`; at least rank 1)."""
    from ..nn.tt import tt_rank_for_parameter_budget

    convs = {n: m for n, m in dense_model.named_modules() if type(m) is nn.Conv2d and m.groups == 1}
    ranks = {}
    for name, params in counts.items():
        if name not in convs:
            raise ValueError(f"counts: layer {name!r} is not a dense groups=1 convolution of dense_model")
        try:
            ranks[name] = tt_rank_for_parameter_budget(convs[name], int(params))
        except ValueError:
            ranks[name] = 1  # budget below the cost of TT-rank 1: the smallest layer there is
    return {"rank": None, "rank_fraction": None, "layer_ranks": ranks}, "per-layer TT ranks"


@register_method("tt", match=match_tt_budgets,
                 description="tensor-train convs (TT-matrix cores over 3 channel factors + a spatial core, "
                             "TT-SVD of the init), torch.optim.SGD")
def _build_tt(model, o):
    from ..nn.tt import tt_factorize_model

    init = "svd" if o.init == "hosvd" else "random"
    if o.layer_ranks is None:
        model = tt_factorize_model(model, ranks=o.rank if o.rank is not None else 8, include_linear=o.linear, init=init)
        return model, sgd(model, o)
    for name, r in o.layer_ranks.items():
        model = tt_factorize_model(model, ranks=int(r), include_linear=o.linear, include=[name], init=init)
    return model, sgd(model, o)


# ------------------------------------------------------------------------------------ pruning
def match_sparsity(dense_model: nn.Module, counts: dict[str, int], method: str) -> tuple[dict, str]:
    """Matcher of the pruning methods: the conv weight sparsity that keeps as many nonzero conv weights
    as the reference stores (``1 - sum(counts) / conv weights``), so the conv compressions are equal."""
    from ..pruning import conv_weight_counts

    _, total = conv_weight_counts(dense_model)
    if not total:
        raise ValueError("dense_model has no nn.Conv2d weight to prune")
    s = min(max(1.0 - sum(int(v) for v in counts.values()) / total, 0.0), 1.0 - 1.0 / total)
    return {"rank": None, "rank_fraction": None, "layer_ranks": None, "sparsity": s}, f"sparsity={s:.4f}"


def _sparsity(o: BuildOptions) -> float:
    return DEFAULT_SPARSITY if o.sparsity is None else o.sparsity


@register_method("snip", match=match_sparsity,
                 prepare=lambda model, batch, o: _prune_at_init(model, batch, o, "snip"),
                 description="SNIP: prune the conv weights once at init by |g*w| on one batch (global), "
                             "torch.optim.SGD; pruned weights held at zero by torch.nn.utils.prune masks")
def _build_snip(model, o):
    return model, sgd(model, o)


@register_method("grasp", match=match_sparsity,
                 prepare=lambda model, batch, o: _prune_at_init(model, batch, o, "grasp"),
                 description="GraSP: prune the conv weights once at init, removing the largest -w*(Hg) on one batch "
                             "(T=200), torch.optim.SGD; masks as snip")
def _build_grasp(model, o):
    return model, sgd(model, o)


def _prune_at_init(model: nn.Module, batch, o: BuildOptions, kind: str) -> None:
    import torch.nn.functional as F

    from ..pruning import apply_masks, grasp_masks, snip_masks

    fn = snip_masks if kind == "snip" else grasp_masks
    apply_masks(model, fn(model, batch, F.cross_entropy, _sparsity(o)))


#: IMP's pruning rounds (1 when the run has only 2 epochs).
IMP_ROUNDS = 2


def imp_plan(epochs: int) -> tuple[int, int]:
    """``(rounds k, rewind epoch e_r)`` of ``imp`` for a run of ``epochs`` epochs: ``k = 2`` (1 for 2
    epochs); rewinding to the initialization (``e_r = 0``, Frankle & Carbin 2019) below 6 epochs, to the
    end of epoch 1 (Frankle et al. 2020) from 6 on. The whole run, all rounds included, takes ``epochs``
    epochs (:func:`tucker_manifold.pruning.imp_schedule`): with 3 epochs, 1 epoch per round and 1 final."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs must be an int >= 2 for imp (one round and the final training), got {epochs!r}")
    k = min(IMP_ROUNDS, epochs - 1)
    return k, (1 if epochs >= 6 else 0)


def _drive_imp(model: nn.Module, run_epochs: Callable[[int, int], list], cfg) -> Any:
    from ..pruning import run_imp

    k, e_r = imp_plan(cfg.epochs)
    sparsity = DEFAULT_SPARSITY if cfg.sparsity is None else cfg.sparsity
    return run_imp(model, lambda m, start, n: run_epochs(start, n), sparsity, total_epochs=cfg.epochs,
                   rounds=k, rewind_epoch=e_r)


@register_method("imp", match=match_sparsity, drive=_drive_imp,
                 description="IMP: k=2 rounds of train / global magnitude pruning of the conv weights / rewinding "
                             "(to init below 6 epochs, else to epoch 1) inside the run's own epoch budget (3 epochs: "
                             "1 per round + 1 final), sparsity 1-(1-s)^(j/k) per round, torch.optim.SGD restarted "
                             "each phase")
def _build_imp(model, o):
    return model, sgd(model, o)


# tdlrt-budget and tdlrt-fixed (training to a parameter budget) live with the budget logic
from . import budgets as _budgets  # noqa: E402,F401
