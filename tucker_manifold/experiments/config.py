"""What defines a run: :class:`TrainConfig`, the one set of defaults (the CLI reads its argparse
defaults from here), the CLI presets, and the argument checks shared by the experiment modules.

Errors name the function's arguments (``tau``, ``rank_fraction``, ...), never command-line flags: the
CLI validates its own flags and translates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch

from ..amp import check_precision
from ..layout import check_memory_format

__all__ = [
    "TrainConfig",
    "DEFAULTS",
    "DEFAULT_COMPARE_METHODS",
    "DEFAULT_COMPARE_TAUS",
    "PRESETS",
    "REFERENCE_METHOD",
    "resolve_device",
    "check_tau",
    "check_rank",
    "check_rank_fraction",
    "check_sparsity",
]


# ------------------------------------------------------------------------------------ argument checks
def check_tau(tau: Any, name: str = "tau") -> float:
    """``tau`` as a float; ValueError unless a finite number >= 0."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {tau!r}")
    return float(tau)


def check_rank(rank: Any, name: str = "rank") -> Optional[int]:
    """``None`` or an int >= 1."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be an int >= 1, got {rank!r}")
    return rank


def check_rank_fraction(f: Any, name: str = "rank_fraction") -> Optional[float]:
    """``None`` or a number in (0, 1]."""
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {f!r}")
    return float(f)


def check_sparsity(s: Any, name: str = "sparsity") -> Optional[float]:
    """``None`` or a number in [0, 1) (the fraction of weights pruned)."""
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < 1):
        raise ValueError(f"{name} must be a number in [0, 1), got {s!r}")
    return float(s)


def _check_int(v: Any, name: str, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"`` (``None`` too), ``"cuda"`` or ``"cuda:N"``; a CUDA device without CUDA is a ValueError."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


# ------------------------------------------------------------------------------------ the config
@dataclass
class TrainConfig:
    """Everything that defines one run (saved in checkpoints and metrics.json). These field defaults
    are THE defaults: ``build_method``, ``compare_methods`` and the CLI all read them from here.

    ``tau`` 0.1 is the tolerance of the README's main command (``tucker-manifold compare`` sweeps 0.1
    and 0.2). ``rank`` / ``rank_fraction``: initial (TDLRT) or fixed (baselines) channel ranks; neither
    given: the method's own default (TDLRT 0.5, fixed-rank baselines 0.25). ``layer_ranks``:
    ``{qualified conv name: rank}``, set by ``compare`` to match a reference's compression.
    """

    model: str = "vgg-mnist"
    data: str = "mnist"
    method: str = "tdlrt"
    tau: float = 0.1
    rank: Optional[int] = None
    rank_fraction: Optional[float] = None
    layer_ranks: Optional[dict] = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    init: str = "hosvd"
    epochs: int = 3
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    subset: Optional[int] = None
    data_root: Optional[str] = None
    image_size: Optional[int] = None
    schedule: str = "cosine"
    rank_every: int = 10
    sparsity: Optional[float] = None  # pruning methods (snip, grasp, imp): fraction of conv weights at zero
    precision: str = "fp32"  # autocast forward/backward: fp32, bf16, fp16 (with a GradScaler); tucker_manifold.amp
    #: layout of 4-D activations and dense conv weights (tucker_manifold.layout): channels_last is faster
    #: on CPU for every method; "contiguous" reproduces runs made before it became the default
    memory_format: str = "channels_last"
    sync_bn: bool = False  # data parallel: nn.SyncBatchNorm (GPUs only); else per-rank statistics (see .launch)
    #: parameter budget (experiments/budgets.py): an int count of Tucker/conv parameters, or a float in
    #: (0, 1], a fraction of the dense conv weights
    budget: Optional[float] = None
    #: (start_epoch, end_epoch): the budget decays from the initial count to N between them (AdaLoRA's
    #: cubic schedule, in optimizer steps of this run); None: N from the first step
    budget_schedule: Optional[tuple] = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from a dict (e.g. a saved one); unknown keys are ignored, missing ones defaulted."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every field; returns ``self``. ValueError naming the field."""
        from .methods import get_method

        get_method(self.method)
        check_tau(self.tau)
        check_rank(self.rank)
        check_rank_fraction(self.rank_fraction)
        check_sparsity(self.sparsity)
        from .budgets import check_budget_schedule_value, check_budget_value

        check_budget_value(self.budget)
        check_budget_schedule_value(self.budget_schedule, self.budget)
        if self.rank is not None and self.rank_fraction is not None:
            raise ValueError("give at most one of rank and rank_fraction")
        _check_int(self.epochs, "epochs", 1)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.rank_every, "rank_every", 1)
        if self.subset is not None:
            _check_int(self.subset, "subset", 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.init not in ("hosvd", "random"):
            raise ValueError(f"init must be 'hosvd' or 'random', got {self.init!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        resolve_device(self.device)
        check_precision(self.precision)
        check_memory_format(self.memory_format)
        if not isinstance(self.sync_bn, bool):
            raise ValueError(f"sync_bn must be True or False, got {self.sync_bn!r}")
        return self


#: The defaults, as an instance (``DEFAULTS.tau``, ``DEFAULTS.lr``, ...).
DEFAULTS = TrainConfig()

#: The method every other one is matched to in ``compare`` (when it is among the methods).
REFERENCE_METHOD = "tdlrt"
DEFAULT_COMPARE_METHODS: tuple[str, ...] = ("dense", "tdlrt", "vanilla-tucker", "cp", "matrix")
#: ``compare``'s tolerances when none are given: the default one only.
DEFAULT_COMPARE_TAUS: tuple[float, ...] = (DEFAULTS.tau,)

# CLI presets (subset = training images; the test set is max(1000, proportional) images). Measured on
# the shared 2-core CPU, one thread, vgg-mnist on MNIST: the default compare (5 methods, taus 0.1 and
# 0.2, 2 seeds = 18 runs on 3000 images, 3 epochs) took 6.3-6.8 min, --quick (1 tau, 1 seed, 2000
# images, 2 epochs) 1.0-1.3 min, the default train (TDLRT, 5000 images, 3 epochs) 1 min.
PRESETS: dict[str, dict[str, dict]] = {
    "train": {"default": dict(subset=5000, epochs=3), "quick": dict(subset=2000, epochs=2)},
    "compare": {"default": dict(subset=3000, epochs=3, seeds=2, taus=(DEFAULTS.tau, 0.2)),
                "quick": dict(subset=2000, epochs=2, seeds=1, taus=(DEFAULTS.tau,))},
}
