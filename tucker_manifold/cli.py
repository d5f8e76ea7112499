"""The ``tucker-manifold`` command: ``train``, ``compare``, ``check`` and ``bench`` (argparse wiring over
:mod:`tucker_manifold.experiments`, :mod:`proofs_checks` and :mod:`tucker_manifold.benchmarks`).

    tucker-manifold train   --model vgg-mnist --data mnist --method tdlrt --tau 0.1 --out runs/train
    tucker-manifold compare --quick                       # TDLRT vs baselines at equal compression
    tucker-manifold check descent --quick                 # numerical check of a theorem (proofs_checks/)
    tucker-manifold bench step_time                       # tucker_manifold/benchmarks/step_time.py

Defaults come from :class:`~tucker_manifold.experiments.TrainConfig` (the one set). User errors
(unknown names, bad values, a missing optional package, an --out that is a file) print one line on
stderr and exit with status 2, without a traceback; set ``TUCKER_MANIFOLD_DEBUG=1`` to see it.
Progress: a bar on a terminal, one line per epoch on stdout in every case (``--no-progress``: no bar).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .benchmarks import BENCHMARKS
from .data import DATASET_NAMES
from .experiments import (
    CHECKPOINT_NAME,
    DEFAULT_COMPARE_METHODS,
    DEFAULTS,
    PRESETS,
    Checkpoint,
    CheckpointError,
    TrainConfig,
    compare_methods,
    markdown_table,
    method_names,
    read_checkpoint,
    resolve_device,
    run_experiment,
    summarize,
)
from .amp import PRECISIONS
from .layout import MEMORY_FORMATS
from .experiments.launch import current, env_world_size, init_from_env, launch, shutdown
from .models import MODEL_NAMES

PROG = "tucker-manifold"
_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
# Options that may change on --resume (every other setting comes from the checkpoint's config).
_RESUME_FREE = {"epochs", "device", "rank_every"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _checks() -> dict:
    from proofs_checks import CHECKS

    return CHECKS


# ------------------------------------------------------------------------------------ argument types
def _int_at_least(name: str, low: int):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= {low}, got {s!r}")
        return v
    return parse


def _float(name: str, lo=None, hi=None, lo_open=False, hi_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        bad = v != v or v in (float("inf"), float("-inf"))
        if lo is not None:
            bad |= v <= lo if lo_open else v < lo
        if hi is not None:
            bad |= v >= hi if hi_open else v > hi
        if bad:
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{name} must be in {rng}, got {s!r}")
        return v
    return parse


_tau = _float("--tau", lo=0.0)
_fraction = _float("--rank-fraction", lo=0.0, hi=1.0, lo_open=True)
_bisect_step = _float("--bisect-step", lo=1.0, lo_open=True)


def _budget(s: str):
    """``--budget``: an int is a parameter count, a number with a point / exponent a fraction in (0, 1]."""
    from .experiments.budgets import check_budget_value

    try:
        v = int(s) if s.strip().lstrip("+").isdigit() else float(s)
        check_budget_value(v, "--budget")
    except ValueError as e:
        msg = str(e) if "--budget" in str(e) else f"--budget must be an int count or a fraction in (0, 1], got {s!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return v


def _budget_schedule(s: str) -> tuple[float, float]:
    """``--budget-schedule START,END`` in epochs."""
    from .experiments.budgets import check_budget_schedule_value

    try:
        v = tuple(float(x) for x in s.split(","))
        check_budget_schedule_value(v, budget=0, name="--budget-schedule")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget-schedule must be START,END in epochs with 0 <= START < END, "
                                         f"got {s!r}") from None
    return v


_SCHEDULE_HELP = ("with --budget: START,END in epochs (e.g. 0,1): the budget decays from the initial Tucker count "
                  "to N between them (AdaLoRA's cubic schedule; tdlrt / tdlrt-budget). Default: N from the first step. "
                  "On vgg-mnist at 10%%, 0,1 raised tdlrt-budget from 89.3%% to 96.6%% (results/budget)")

_BUDGET_HELP = ("parameter budget N: an int (a count) or a fraction in (0, 1] of the dense model's conv weights "
                "(e.g. 0.1); N counts the Tucker parameters (cores + factors) of the factorized convs, i.e. "
                "the final conv_params")


def _tau_list(s: str) -> list[float]:
    return [_tau(t) for t in s.split(",") if t.strip()]


def _method_list(s: str) -> list[str]:
    methods = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; valid methods: {', '.join(method_names())}")
    return methods


# ------------------------------------------------------------------------------------ parser
# Options that set a TrainConfig field default to None: the config's default applies when absent, and
# "given on the command line" is simply "not None" (what --resume checks against the checkpoint).
def _add_common(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help=f"network: {', '.join(MODEL_NAMES)} (default: {d.model})")
    g.add_argument("--data", default=None, help=f"dataset: {', '.join(DATASET_NAMES)} (default: {d.data}; "
                                                "'digits' is scikit-learn's small fallback)")
    g.add_argument("--data-root", default=None, help="folder of the IDX / CIFAR-10 files (mnist-idx, cifar10)")
    g.add_argument("--subset", type=_int_at_least("--subset", 1), default=None,
                   help="number of training images (default: preset; the test set gets max(1000, proportional))")
    g.add_argument("--full", action="store_true", help="use the whole training set (overrides the preset subset)")
    g.add_argument("--image-size", type=_int_at_least("--image-size", 1), default=None,
                   help="resize images to this size (e.g. 28 for digits)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_float("--lr", lo=0.0, lo_open=True), default=None,
                   help=f"learning rate, the same for every method (default: {d.lr})")
    g.add_argument("--momentum", type=_float("--momentum", lo=0.0, hi=1.0, hi_open=True), default=None,
                   help=f"SGD momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", type=_float("--weight-decay", lo=0.0), default=None,
                   help=f"L2 weight decay (default: {d.weight_decay})")
    g.add_argument("--epochs", type=_int_at_least("--epochs", 1), default=None, help="epochs (default: preset)")
    g.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=None,
                   help=f"batch size, the global one with --nproc (default: {d.batch_size})")
    g.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help=f"learning-rate schedule over the run (default: {d.schedule}, to 0 at the last epoch)")
    g.add_argument("--init", choices=("hosvd", "random"), default=None,
                   help="factorized layers: decompose the dense initialisation (hosvd) or draw them afresh "
                        f"(random) (default: {d.init})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=None, help=f"random seed (default: {d.seed})")
    g.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default: {d.device})")
    g.add_argument("--threads", type=_int_at_least("--threads", 0), default=1,
                   help="CPU threads for torch (default: 1; 0 = torch's default). These nets are small: on a "
                        "shared 2-core machine one thread measured 2-6x faster than two. Results are "
                        "bit-identical for a given seed and thread count")
    g.add_argument("--rank-every", type=_int_at_least("--rank-every", 1), default=None,
                   help=f"record the ranks every N steps for ranks.json / ranks.png (default: {d.rank_every})")
    g.add_argument("--quick", action="store_true", help="small preset: fewer images and epochs")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"autocast forward/backward: fp32, bf16 or fp16 (with a loss scaler); parameters and "
                        f"TDLRT's QR/SVD stay fp32 (default: {d.precision})")
    g.add_argument("--memory-format", choices=MEMORY_FORMATS, default=None,
                   help="layout of the 4-D activations and dense conv weights: channels_last is faster on CPU for "
                        "every method (benchmarks/results/step_time.md); contiguous reproduces runs made before "
                        f"it became the default (default: {d.memory_format})")
    g.add_argument("--nproc", type=_int_at_least("--nproc", 1), default=None,
                   help="data-parallel processes on this machine (starts torchrun; the same as "
                        "'torchrun --nproc-per-node N -m tucker_manifold.cli ...'). --batch-size is the global "
                        "batch (each process takes batch-size / N); only rank 0 writes. CPU: gloo; "
                        "--device cuda: NCCL, one GPU per process")
    g.add_argument("--sync-bn", action="store_const", const=True, default=None,
                   help="with several processes: nn.SyncBatchNorm (GPUs only); default: per-process batch "
                        "statistics, running statistics averaged at every epoch end")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (the bar is drawn on a terminal only; one line per epoch either way)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tucker-format layers trained with the rank-adaptive TDLRT integrator, and baselines.",
        epilog="examples:\n"
               "  tucker-manifold compare --quick                  # TDLRT vs baselines at equal compression\n"
               "  tucker-manifold train --method tdlrt --tau 0.1 --out runs/tdlrt\n"
               "  tucker-manifold train --out runs/tdlrt --epochs 5 --resume\n"
               "  tucker-manifold check all --quick                # numerical checks of Thms 3.1-3.3\n"
               "  tucker-manifold bench step_time                  # training-step timings\n"
               "run 'tucker-manifold COMMAND --help' for the options of a command",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,compare,check,bench,finetune,finetune-conv}",
                                parser_class=lambda **kw: argparse.ArgumentParser(allow_abbrev=False, **kw))

    p = sub.add_parser("train", help="train one model with one method",
                       description=f"Train one model with one method; writes metrics.json, history.csv, "
                                   f"{CHECKPOINT_NAME}, ranks.json and ranks.png to --out.")
    p.add_argument("--method", choices=method_names(), default=None, help=f"training method (default: {DEFAULTS.method})")
    p.add_argument("--tau", type=_tau, default=None,
                   help=f"TDLRT relative truncation tolerance (default: {DEFAULTS.tau})")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--rank", type=_int_at_least("--rank", 1), default=None,
                   help="channel rank of every factorized conv (TDLRT: initial rank)")
    r.add_argument("--rank-fraction", type=_fraction, default=None,
                   help="channel ranks as a fraction of the channels (default: 0.5 for tdlrt, 0.25 for fixed-rank methods)")
    p.add_argument("--budget", type=_budget, default=None,
                   help=_BUDGET_HELP + ". tdlrt-budget: TDLRT(budget=N); tdlrt: N a ceiling, --tau a floor; "
                        "fixed-rank methods: the largest uniform ranks within N")
    p.add_argument("--budget-schedule", type=_budget_schedule, default=None, help=_SCHEDULE_HELP)
    _add_common(p)
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME} to --epochs total")
    p.set_defaults(func=cmd_train)

    cp = PRESETS["compare"]
    p = sub.add_parser("compare", help="TDLRT vs baselines at equal conv compression",
                       description="Runs TDLRT for every tau and seed, then each baseline with ranks matched to "
                                   "TDLRT's final conv parameter count; writes results.csv, results.md and "
                                   "accuracy_vs_compression.png to --out and prints the table.")
    p.add_argument("--methods", type=_method_list, default=list(DEFAULT_COMPARE_METHODS),
                   help=f"comma-separated methods (default: {','.join(DEFAULT_COMPARE_METHODS)}; "
                        f"valid: {','.join(method_names())})")
    p.add_argument("--tau", dest="taus", metavar="TAU", type=_tau_list, nargs="+", default=None,
                   help="TDLRT tolerances, comma- or space-separated (default: "
                        f"{','.join(f'{t:g}' for t in cp['default']['taus'])}; "
                        f"--quick: {','.join(f'{t:g}' for t in cp['quick']['taus'])})")
    p.add_argument("--seeds", type=_int_at_least("--seeds", 1), default=None,
                   help=f"seeds per setting, from --seed on (default: {cp['default']['seeds']}; "
                        f"--quick: {cp['quick']['seeds']})")
    p.add_argument("--rank-fraction", type=_fraction, default=None,
                   help="TDLRT's initial channel rank fraction (default: 0.5); without tdlrt in --methods, "
                        "the baselines' fixed fraction (default: 0.25)")
    p.add_argument("--budget", type=_budget, default=None,
                   help=_BUDGET_HELP + ". Runs every method at N: tdlrt-budget with budget=N; tdlrt at the tau "
                        "whose final count is closest below N (bisection over full runs of the first seed, "
                        "starting at the first --tau); fixed-rank methods (vanilla-tucker, tdlrt-fixed, ...) at the "
                        "largest uniform ranks within N; cp / matrix within per-layer shares of N; dense as the "
                        "reference. E.g. --budget 0.1 --methods tdlrt-budget,tdlrt,vanilla-tucker,tdlrt-fixed")
    p.add_argument("--budget-schedule", type=_budget_schedule, default=None, help=_SCHEDULE_HELP)
    p.add_argument("--bisect-runs", type=_int_at_least("--bisect-runs", 1), default=6,
                   help="with --budget: at most this many runs in tdlrt's tau bisection (default: 6)")
    p.add_argument("--reuse", action="store_true",
                   help="read back every run whose OUT/runs/<tag>/metrics.json is a finished run of the same config, CPU capability "
                        "and thread count instead of training it: an interrupted compare goes on where it stopped, "
                        "and runs split over several compares (copied into one OUT/runs) are tabulated together. "
                        "Not with --budget")
    p.add_argument("--bisect-step", type=_bisect_step, default=2.0,
                   help="with --budget: tau is multiplied / divided by this until N is bracketed, then bisected "
                        "(default: 2; e.g. 1.1 when --tau is already close, such as the tau of a smaller setting)")
    _add_common(p)
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="numerical checks of the theorems (proofs_checks)",
                       description="Run proofs_checks.<NAME>.main(argv) with the arguments after NAME "
                                   "(e.g. --quick, --out DIR; each check writes to ./runs/checks/NAME unless "
                                   "--out is given; 'tucker-manifold check NAME --help' shows its options). "
                                   "'all' runs every check (--out DIR gets one subfolder per check) and fails "
                                   "if any fails.")
    p.add_argument("name", help=f"one of {', '.join(_checks())}, or 'all'")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the check")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="run a benchmark (tucker_manifold.benchmarks)",
                       description="Run the benchmark NAME (tucker_manifold.benchmarks.NAME.main) with the "
                                   "arguments after NAME; outputs go to ./runs/bench/NAME unless --out DIR.")
    p.add_argument("name", nargs="?", default=None, help=f"one of {', '.join(BENCHMARKS)} (omit to list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark (e.g. --help)")
    p.set_defaults(func=cmd_bench)

    # fine-tuning demos (tucker_manifold.adapters): their own option sets, on subparsers
    from .adapters import conv_demo, finetune

    p = sub.add_parser("finetune", help="fine-tune all-MiniLM-L6-v2 on BBC News: Tucker adapters vs LoRA/AdaLoRA",
                       description="Fine-tune all-MiniLM-L6-v2 on BBC News (extra [finetune]): Tucker adapters "
                                   "(TDLRT / ParallelTDLRT) vs head only, full, PEFT LoRA and AdaLoRA; writes "
                                   "table.md, summary.csv, results.json and plots to --out.")
    finetune.build_parser(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("finetune-conv", help="conv adapters: VGG-MNIST 0-4 -> 5-9, Tucker vs LoRA Conv2d",
                       description="Pretrain VGG-MNIST on digits 0-4, fine-tune on 5-9 with Tucker conv adapters "
                                   "(4-way), PEFT LoRA Conv2d and a flattened-kernel LoRA; writes table.md, "
                                   "summary.csv, results.json and plots to --out.")
    conv_demo.build_parser(p)
    p.set_defaults(func=cmd_finetune_conv)
    return parser


# ------------------------------------------------------------------------------------ helpers
def _check_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out!r} exists and is not a directory")
    return path


def _normalize_names(args) -> None:
    """Normalize ``--model`` / ``--data`` (case, ``_`` for ``-``) and check them (when given)."""
    if args.model is not None:
        args.model = args.model.strip().lower().replace("_", "-")
        if args.model not in MODEL_NAMES:
            raise CLIError(f"unknown model {args.model!r}; valid models: {', '.join(MODEL_NAMES)}")
    if args.data is not None:
        data = args.data.strip().lower()
        args.data = {"cifar-10": "cifar10", "mnist_idx": "mnist-idx"}.get(data, data)
        if args.data not in DATASET_NAMES:
            raise CLIError(f"unknown dataset {args.data!r}; valid datasets: {', '.join(DATASET_NAMES)}")
        if args.data in ("mnist-idx", "cifar10") and args.data_root is None:
            what = "the MNIST IDX files" if args.data == "mnist-idx" else "the CIFAR-10 python batches"
            raise CLIError(f"--data {args.data} reads files from disk: pass --data-root DIR (the folder with {what})")
    if args.device is not None:
        try:
            resolve_device(args.device)
        except ValueError as e:
            raise CLIError(f"--device: {e}") from None


def _given(args) -> dict:
    """The TrainConfig fields set on the command line."""
    return {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS and v is not None}


def _config(args, preset: dict, **fixed) -> TrainConfig:
    """Defaults, then the preset, then the options given, then ``fixed``."""
    values = {"epochs": preset["epochs"], "subset": preset["subset"], **_given(args), **fixed}
    if args.full:
        values["subset"] = None
    return TrainConfig.from_dict({**DEFAULTS.to_dict(), **values})


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _read_resume(out: Path, epochs: int) -> Checkpoint:
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        old = " (checkpoint.pt there is a pickle of an older version: it is not loaded, for safety)" \
            if (out / "checkpoint.pt").is_file() else " (run without --resume first)"
        raise CLIError(f"--resume: no checkpoint at {path}{old}")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise CLIError(f"--resume: {e}") from None
    if ckpt.epoch >= epochs:
        raise CLIError(f"--resume: the run in {out} already has {ckpt.epoch} epoch(s); pass --epochs > {ckpt.epoch} "
                       "to train further")
    return ckpt


def _check_resume_matches(ckpt: Checkpoint, args) -> None:
    """--resume takes the run's settings from the checkpoint; an option given on the command line that
    contradicts them is an error rather than silently ignored."""
    given = _given(args)
    if args.quick or args.full:
        given.setdefault("subset", _config(args, _preset("train", args)).subset)
    if "rank" in given or "rank_fraction" in given:
        given.setdefault("rank", None)
        given.setdefault("rank_fraction", None)
    saved = ckpt.config
    conflicts = [f"{_flag(k)} {v} (the run has {saved[k]})" for k, v in sorted(given.items())
                 if k not in _RESUME_FREE and k in saved and v != saved[k]]
    if conflicts:
        raise CLIError("--resume continues the run saved in --out with its own settings; these options "
                       "contradict it: " + "; ".join(conflicts) + ". Drop them or use a new --out.")


def _preset(cmd: str, args) -> dict:
    return dict(PRESETS[cmd]["quick" if args.quick else "default"])


# ------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    out = _check_out(args.out)
    _normalize_names(args)
    cfg = _config(args, _preset("train", args))
    ckpt = None
    if args.resume:
        ckpt = _read_resume(out, cfg.epochs)
        _check_resume_matches(ckpt, args)
    elif (out / CHECKPOINT_NAME).is_file() and current().is_main:
        print(f"note: overwriting the run in {out} (use --resume to continue it)", file=sys.stderr)
    t0 = time.perf_counter()
    m = run_experiment(cfg, out, resume=ckpt if ckpt is not None else False,
                       progress=False if args.no_progress else None).metrics
    ranks = m["ranks"]
    mean_rank = (sum(sum(r[:2]) / len(r[:2]) for r in ranks.values()) / len(ranks)) if ranks else None
    print(
        f"{m['config']['method']} on {m['config']['model']}/{m['dataset']}: test acc {m['test_acc']:.4f}, "
        f"conv compression {m['conv_compression']:.1%}, total compression {m['total_compression']:.1%}, "
        + (f"mean channel rank {mean_rank:.1f}, " if mean_rank is not None else "")
        + f"{m['time_per_epoch_s']:.1f} s/epoch ({time.perf_counter() - t0:.0f} s in all); wrote {out}/"
    )
    return 0


def cmd_compare(args) -> int:
    out = _check_out(args.out)
    _normalize_names(args)
    preset = _preset("compare", args)
    taus = [t for chunk in args.taus for t in chunk] if args.taus else list(preset["taus"])
    if not taus:
        raise CLIError("--tau: give at least one value")
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    base = _config(args, preset, method="tdlrt", tau=taus[0], rank=None)
    t0 = time.perf_counter()
    if args.budget is not None and args.reuse:
        raise CLIError("--reuse: not with --budget (a budget compare's bisection decides which runs it needs)")
    if args.budget is not None:
        from .experiments.budgets import budget_table, compare_at_budget

        rows = compare_at_budget(base, args.methods, args.budget, seeds=list(range(base.seed, base.seed + seeds)),
                                 out=out, progress=False if args.no_progress else None,
                                 max_bisect_runs=args.bisect_runs, bisect_step=args.bisect_step)
        print(budget_table(rows, rows[0]["budget"], rows[0]["dense_conv_params"], base))
        print(f"\n{time.perf_counter() - t0:.0f} s in all; wrote {out}/results.csv, results.md, bisection.csv, "
              "ranks_per_layer.png")
        return 0
    rows = compare_methods(base, methods=args.methods, taus=taus, seeds=list(range(base.seed, base.seed + seeds)),
                           out=out, progress=False if args.no_progress else None, reuse=args.reuse)
    print(markdown_table(summarize(rows), base))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; wrote {out}/results.csv, results.md, "
          f"accuracy_vs_compression.png")
    return 0


def _exit_code(rc) -> int:
    return 0 if rc is None else (rc if isinstance(rc, int) else 1)


def _run_check(name: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(f"proofs_checks.{name}")
    except ModuleNotFoundError as e:
        if e.name in ("proofs_checks", f"proofs_checks.{name}"):
            raise CLIError(f"check {name!r} not found (proofs_checks.{name}); valid checks: "
                           f"{', '.join(_checks())}, all") from None
        raise
    main_fn = getattr(mod, "main", None)
    if not callable(main_fn):
        raise CLIError(f"proofs_checks.{name} has no main(argv) function")
    try:
        return _exit_code(main_fn(argv))
    except SystemExit as e:  # a check that calls sys.exit / argparse errors
        return _exit_code(e.code)


def cmd_check(args, extra: list[str]) -> int:
    rest = list(args.args) + list(extra)
    if args.name != "all":  # a name outside CHECKS still runs if proofs_checks.<name> exists
        return _run_check(args.name, rest)
    # "all" is the one report (proofs_checks/report.py): every check into --out DIR/<name>, the mutation
    # table, and DIR/report.md + report.json with every verdict and its worst slack
    print("== check all: every check, the mutation table and one report", flush=True)
    return _run_check("report", rest)


def cmd_bench(args, extra: list[str]) -> int:
    if args.name is None:
        print("benchmarks (tucker-manifold bench NAME [--help]):")
        for name, what in BENCHMARKS.items():
            print(f"  {name:<16} {what}")
        return 0
    name = args.name[:-3] if args.name.endswith(".py") else args.name
    if name not in BENCHMARKS:
        raise CLIError(f"unknown benchmark {args.name!r}; available: {', '.join(BENCHMARKS)}")
    main_fn = importlib.import_module(f"tucker_manifold.benchmarks.{name}").main
    try:
        return _exit_code(main_fn([*args.args, *extra]))
    except SystemExit as e:  # argparse --help / errors inside the benchmark
        return _exit_code(e.code)


def _demo_error(e: Exception, parser_args) -> CLIError:
    """A demo config's ValueError ("max_length must be ...") as a CLIError naming the flag (--max-length)."""
    msg = str(e)
    name = msg.split(" ", 1)[0]
    flag = {"finetune_size": "--train-size"}.get(name, _flag(name))
    if name.isidentifier() and (name in vars(parser_args) or name == "finetune_size"):
        msg = flag + msg[len(name):]
    return CLIError(msg)


def cmd_finetune(args) -> int:
    from .adapters import _demo, finetune

    try:
        cfg = finetune.config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise _demo_error(e, args) from None
    with _demo.log_to_stdout("tucker_manifold.adapters"):
        finetune.run_finetune(cfg)
    return 0


def cmd_finetune_conv(args) -> int:
    from .adapters import _demo, conv_demo
    from .adapters.finetune import _lr_items

    try:  # the same mapping as conv_demo.main
        cfg = conv_demo.ConvDemoConfig(
            methods=[m.strip() for m in args.methods.split(",") if m.strip()], seeds=args.seeds, epochs=args.epochs,
            pretrain_size=args.pretrain_size, pretrain_epochs=args.pretrain_epochs, finetune_size=args.train_size,
            test_size=args.test_size, lora_rank=args.lora_rank, init_rank=args.init_rank, tau=args.tau,
            lr=_lr_items(args.lr), out=args.out, progress=args.progress,
        ).validate()
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise _demo_error(e, args) from None
    with _demo.log_to_stdout("tucker_manifold.adapters"):
        conv_demo.run_conv_demo(cfg)
    return 0


# ------------------------------------------------------------------------------------ entry point
def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each torchrun process is given)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tucker-manifold``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # check / bench pass unknown options on to what they run.
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in ("check", "bench"):
            parser.parse_args(argv)  # reports the unknown arguments the usual way
    except SystemExit as e:
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 2)
    if args.command is None:
        parser.print_help()
        return 2
    nproc = getattr(args, "nproc", None)
    if nproc is not None and env_world_size() == 1 and nproc > 1:  # start torchrun, which runs this again
        return launch(nproc, _without_nproc(argv))
    if nproc is not None and env_world_size() > 1 and nproc != env_world_size():
        return _error(f"--nproc {nproc} under torchrun with WORLD_SIZE={env_world_size()}: drop --nproc")
    debug = os.environ.get("TUCKER_MANIFOLD_DEBUG", "") not in ("", "0")
    threads = getattr(args, "threads", None)
    old_threads = None
    # the experiments log one line per epoch and one per run: the command shows them on stdout (the
    # per-conversion details of tuckerize / factorize_model stay at their loggers' default level)
    log = logging.getLogger("tucker_manifold.experiments")
    handler, old_level = logging.StreamHandler(sys.stdout), log.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    distributed = args.command in ("train", "compare") and env_world_size() > 1
    try:
        if threads:
            import torch

            old_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        if args.command in ("check", "bench"):
            return args.func(args, extra)
        if distributed:  # under torchrun: gloo / NCCL from its environment; rank 0 alone prints and logs
            if not init_from_env(args.device or DEFAULTS.device).is_main:
                log.removeHandler(handler)
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                    return args.func(args)
        return args.func(args)
    except CLIError as e:
        return _error(str(e))
    except ImportError as e:
        if debug:
            raise
        msg = str(e)
        if "tucker-manifold[" not in msg and getattr(e, "name", None) in ("pureml", "sklearn", "zarr", "matplotlib"):
            extra_name = "plot" if e.name == "matplotlib" else "data"
            msg += f' (install it with: pip install "tucker-manifold[{extra_name}]")'
        return _error(msg)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        if debug:
            raise
        msg = str(e)
        if "image_size" in msg and getattr(args, "image_size", None) is None:
            msg += " (resize the images with --image-size, e.g. --image-size 28 for --data digits)"
        return _error(msg)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if distributed:
            shutdown()
        log.removeHandler(handler)
        log.setLevel(old_level)
        if old_threads is not None:  # main() may run in-process (tests, notebooks): leave no trace
            import torch

            torch.set_num_threads(old_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
