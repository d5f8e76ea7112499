"""The ``tucker-manifold`` command: ``train``, ``compare``, ``check`` and ``bench``.

    tucker-manifold train   --model vgg-mnist --data mnist --method tdlrt --tau 0.1 --out runs/train
    tucker-manifold compare --quick                       # TDLRT vs baselines at equal compression
    tucker-manifold check descent --quick                 # numerical check of a theorem (proofs_checks/)
    tucker-manifold bench step_time                       # benchmarks/step_time.py

User errors (unknown names, bad values, a missing optional package, an --out that is a file) print one
line on stderr and exit with status 2, without a traceback; set ``TUCKER_MANIFOLD_DEBUG=1`` to see it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .training import METHODS

PROG = "tucker-manifold"
# Fallbacks only: the names are read from tucker_manifold.models / .data / proofs_checks when present.
MODELS = ("lenet5", "vgg-mnist", "alexnet", "vgg16", "resnet18")
DATASETS = ("mnist", "digits", "mnist-idx", "cifar10")
CHECKS = ("descent", "convergence", "approximation", "robustness")
DEFAULT_COMPARE_METHODS = ("dense", "tdlrt", "vanilla-tucker", "cp", "matrix")

# Presets (subset = training images; the test set is max(1000, proportional) images). Measured on the
# shared 2-core CPU, one thread, vgg-mnist on MNIST: the default compare (5 methods, taus 0.1 and 0.2,
# 2 seeds = 18 runs on 3000 images, 3 epochs) took 6.3-6.8 min, --quick (1 tau, 1 seed, 2000 images,
# 2 epochs) 1.0-1.3 min, the default train (TDLRT, 5000 images, 3 epochs) 1 min.
PRESETS = {
    "train": {"default": dict(subset=5000, epochs=3), "quick": dict(subset=2000, epochs=2)},
    "compare": {"default": dict(subset=3000, epochs=3, seeds=2, tau=[0.1, 0.2]),
                "quick": dict(subset=2000, epochs=2, seeds=1, tau=[0.15])},
}
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH = 32
DEFAULT_TAU = 0.15


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------ argument types
def _int_at_least(name, low):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= {low}, got {s!r}")
        return v
    return parse


def _positive_int(name):
    return _int_at_least(name, 1)


def _nonneg_int(name):
    return _int_at_least(name, 0)


def _float(name, lo=None, hi=None, lo_open=False, hi_open=False):
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
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            rng = f"{lb}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{rb}"
            raise argparse.ArgumentTypeError(f"{name} must be in {rng}, got {s!r}")
        return v
    return parse


def _tau(s):
    return _float("--tau", lo=0.0)(s)


def _tau_list(s):
    return [_tau(t) for t in s.split(",") if t.strip()]


def _method_list(s):
    methods = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; valid methods: {', '.join(METHODS)}")
    return methods


# ------------------------------------------------------------------------------------ parser
def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="vgg-mnist", help=f"network: {', '.join(MODELS)} (default: vgg-mnist)")
    g.add_argument("--data", default="mnist",
                   help=f"dataset: {', '.join(DATASETS)} (default: mnist; 'digits' is scikit-learn's small fallback)")
    g.add_argument("--data-root", default=None, help="folder of the IDX / CIFAR-10 files (mnist-idx, cifar10)")
    g.add_argument("--subset", type=_positive_int("--subset"), default=None,
                   help="number of training images (default: preset; the test set gets max(1000, proportional)); "
                        "--full uses them all")
    g.add_argument("--full", action="store_true", help="use the whole training set (overrides the preset subset)")
    g.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                   help="resize images to this size (e.g. 28 for digits)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_float("--lr", lo=0.0, lo_open=True), default=DEFAULT_LR,
                   help=f"learning rate, the same for every method (default: {DEFAULT_LR})")
    g.add_argument("--momentum", type=_float("--momentum", lo=0.0, hi=1.0, hi_open=True), default=DEFAULT_MOMENTUM,
                   help=f"SGD momentum (default: {DEFAULT_MOMENTUM})")
    g.add_argument("--weight-decay", type=_float("--weight-decay", lo=0.0), default=0.0, help="L2 weight decay")
    g.add_argument("--epochs", type=_positive_int("--epochs"), default=None, help="epochs (default: preset)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=DEFAULT_BATCH,
                   help=f"batch size (default: {DEFAULT_BATCH})")
    g.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning-rate schedule over the run (default: cosine, to 0 at the last epoch)")
    g.add_argument("--init", choices=("hosvd", "random"), default="hosvd",
                   help="factorized layers: decompose the dense initialisation (hosvd) or draw them afresh (random)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--threads", type=_nonneg_int("--threads"), default=1,
                   help="CPU threads for torch (default: 1; 0 = torch's default). These nets are small: on a "
                        "shared 2-core machine one thread measured 2-6x faster than two")
    g.add_argument("--rank-every", type=_positive_int("--rank-every"), default=10,
                   help="record the ranks every N steps for ranks.json / ranks.png (default: 10)")
    g.add_argument("--quick", action="store_true", help="small preset: fewer images and epochs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tucker-format layers trained with the rank-adaptive TDLRT integrator, and baselines.",
        epilog="examples:\n"
               "  tucker-manifold compare --quick                  # TDLRT vs baselines at equal compression\n"
               "  tucker-manifold train --method tdlrt --tau 0.15 --out runs/tdlrt\n"
               "  tucker-manifold train --out runs/tdlrt --epochs 5 --resume\n"
               "  tucker-manifold check all --quick                # numerical checks of Thms 3.1-3.3\n"
               "  tucker-manifold bench step_time                  # benchmarks/step_time.py\n"
               "run 'tucker-manifold COMMAND --help' for the options of a command",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,compare,check,bench}",
                                parser_class=lambda **kw: argparse.ArgumentParser(allow_abbrev=False, **kw))

    p = sub.add_parser("train", help="train one model with one method",
                       description="Train one model with one method; writes metrics.json, history.csv, "
                                   "checkpoint.pt, ranks.json and ranks.png to --out.")
    p.add_argument("--method", choices=METHODS, default="tdlrt", help="training method (default: tdlrt)")
    p.add_argument("--tau", type=_tau, default=DEFAULT_TAU,
                   help=f"TDLRT relative truncation tolerance (default: {DEFAULT_TAU})")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--rank", type=_positive_int("--rank"), default=None,
                   help="channel rank of every factorized conv (TDLRT: initial rank)")
    r.add_argument("--rank-fraction", type=_float("--rank-fraction", lo=0.0, hi=1.0, lo_open=True), default=None,
                   help="channel ranks as a fraction of the channels (default: 0.5 for tdlrt, 0.25 for fixed-rank methods)")
    _add_common(p)
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt to --epochs total")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="TDLRT vs baselines at equal conv compression",
                       description="Runs TDLRT for every tau and seed, then each baseline with ranks matched to "
                                   "TDLRT's final conv parameter count; writes results.csv, results.md and "
                                   "accuracy_vs_compression.png to --out and prints the table.")
    p.add_argument("--methods", type=_method_list, default=list(DEFAULT_COMPARE_METHODS),
                   help=f"comma-separated methods (default: {','.join(DEFAULT_COMPARE_METHODS)}; "
                        f"valid: {','.join(METHODS)})")
    p.add_argument("--tau", type=_tau_list, nargs="+", default=None,
                   help="TDLRT tolerances, comma- or space-separated (default: preset)")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=None, help="seeds per setting (default: preset)")
    p.add_argument("--rank-fraction", type=_float("--rank-fraction", lo=0.0, hi=1.0, lo_open=True), default=None,
                   help="TDLRT's initial channel rank fraction (default: 0.5); without tdlrt in --methods, "
                        "the baselines' fixed fraction (default: 0.25)")
    _add_common(p)
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="numerical checks of the theorems (proofs_checks)",
                       description="Run proofs_checks.<NAME>.main(argv) with the arguments after NAME "
                                   "(e.g. --quick, --out DIR; 'tucker-manifold check NAME --help' shows the "
                                   "check's own options). 'all' runs every check (--out DIR gets one "
                                   "subfolder per check) and fails if any fails.")
    p.add_argument("name", help=f"one of {', '.join(CHECKS)}, or 'all'")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the check")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="run a benchmark (tucker_manifold.benchmarks)",
                       description="Run the benchmark NAME (tucker_manifold.benchmarks.NAME.main) with the "
                                   "arguments after NAME; outputs go to ./runs/bench/NAME unless --out DIR.")
    p.add_argument("name", nargs="?", default=None, help="benchmark name (omit to list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script (e.g. --help)")
    p.set_defaults(func=cmd_bench)
    return parser


# ------------------------------------------------------------------------------------ helpers
def _check_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out!r} exists and is not a directory")
    return path


def _validate_names(args) -> None:
    """Normalize ``args.model`` / ``args.data`` (case, ``_`` for ``-``) and check them."""
    args.model = model = args.model.strip().lower().replace("_", "-")
    args.data = data = {"cifar-10": "cifar10", "mnist_idx": "mnist-idx"}.get(args.data.strip().lower(),
                                                                           args.data.strip().lower())
    if model not in _known_models():
        raise CLIError(f"unknown model {model!r}; valid models: {', '.join(_known_models())}")
    if data not in _known_datasets():
        raise CLIError(f"unknown dataset {data!r}; valid datasets: {', '.join(_known_datasets())}")
    if data in ("mnist-idx", "cifar10") and args.data_root is None:
        what = "the MNIST IDX files" if data == "mnist-idx" else "the CIFAR-10 python batches"
        raise CLIError(f"--data {data} reads files from disk: pass --data-root DIR (the folder with {what})")


def _names_from(module: str, attrs: Sequence[str], fallback: Sequence[str]) -> tuple[str, ...]:
    """Names registered in a colleague module (dict or sequence attribute), else the documented ones."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return tuple(fallback)
    for a in attrs:
        v = getattr(mod, a, None)
        if callable(v) and not isinstance(v, type):
            try:
                v = v()
            except Exception:
                continue
        if isinstance(v, dict) and v:
            return tuple(v)
        if isinstance(v, (list, tuple, set, frozenset)) and v and all(isinstance(x, str) for x in v):
            return tuple(v)
    return tuple(fallback)


def _known_models() -> tuple[str, ...]:
    return _names_from("tucker_manifold.models", ("MODELS", "MODEL_NAMES", "available_models"), MODELS)


def _known_datasets() -> tuple[str, ...]:
    return _names_from("tucker_manifold.data", ("DATASETS", "DATASET_NAMES", "available_datasets"), DATASETS)


def _preset(cmd: str, args) -> dict:
    return dict(PRESETS[cmd]["quick" if args.quick else "default"])


def _base_config(args, preset: dict, method: str, tau: float):
    from .training import TrainConfig

    subset = None if args.full else (args.subset if args.subset is not None else preset["subset"])
    return TrainConfig(
        model=args.model, data=args.data, method=method, tau=tau,
        rank=getattr(args, "rank", None), rank_fraction=args.rank_fraction,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, init=args.init,
        epochs=args.epochs if args.epochs is not None else preset["epochs"], batch_size=args.batch_size,
        seed=args.seed, device=args.device, subset=subset, data_root=args.data_root, image_size=args.image_size,
        schedule=args.schedule, rank_every=args.rank_every,
    )


def _check_device(device: str) -> None:
    from .training import resolve_device

    try:
        resolve_device(device)
    except ValueError as e:
        raise CLIError(f"--device: {e}") from None


# ------------------------------------------------------------------------------------ commands
# Options that may change on --resume (everything else comes from the checkpoint's config).
_RESUME_FREE = {"epochs", "device", "threads", "no_progress", "out", "resume", "quick", "full", "func", "command",
                "rank_every"}


def _check_resume_matches(ckpt: Path, cfg, args) -> None:
    """--resume takes the run's settings from the checkpoint; an option given on the command line that
    contradicts them is an error rather than silently ignored."""
    import torch

    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user-facing error
        raise CLIError(f"--resume: cannot read {ckpt}: {e}") from None
    given = getattr(args, "_explicit", set())
    if args.quick or args.full:
        given = given | {"subset"}
    if "rank" in given or "rank_fraction" in given:
        given = given | {"rank", "rank_fraction"}
    conflicts = []
    for dest in sorted(given - _RESUME_FREE):
        if dest in saved and getattr(cfg, dest, None) != saved[dest]:
            conflicts.append(f"--{dest.replace('_', '-')} {getattr(cfg, dest)} (the run has {saved[dest]})")
    if conflicts:
        raise CLIError("--resume continues the run saved in --out with its own settings; these options "
                       "contradict it: " + "; ".join(conflicts) + ". Drop them or use a new --out.")


def cmd_train(args) -> int:
    from .training import run_experiment

    out = _check_out(args.out)
    _validate_names(args)
    _check_device(args.device)
    cfg = _base_config(args, _preset("train", args), args.method, args.tau)
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise CLIError(f"--resume: no checkpoint at {out / 'checkpoint.pt'} (run without --resume first)")
    if args.resume:
        _check_resume_matches(out / "checkpoint.pt", cfg, args)
    if not args.resume and (out / "checkpoint.pt").is_file():
        print(f"note: overwriting the run in {out} (use --resume to continue it)", file=sys.stderr)
    t0 = time.perf_counter()
    m = run_experiment(cfg, out, resume=args.resume, progress=not args.no_progress)
    m.pop("model_object", None)
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
    from .training import compare_methods

    out = _check_out(args.out)
    _validate_names(args)
    _check_device(args.device)
    preset = _preset("compare", args)
    taus = [t for chunk in args.tau for t in chunk] if args.tau else preset["tau"]
    if not taus:
        raise CLIError("--tau: give at least one value")
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    base = _base_config(args, preset, "tdlrt", taus[0])
    base.rank = None
    t0 = time.perf_counter()
    compare_methods(base, methods=args.methods, taus=taus, seeds=list(range(args.seed, args.seed + seeds)),
                    out=out, progress=not args.no_progress)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; wrote {out}/results.csv, results.md, "
          f"accuracy_vs_compression.png")
    return 0


def _run_check(name: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(f"proofs_checks.{name}")
    except ModuleNotFoundError as e:
        if e.name in ("proofs_checks", f"proofs_checks.{name}"):
            raise CLIError(f"check {name!r} not found (proofs_checks.{name}); valid checks: "
                           f"{', '.join(_known_checks())}, all") from None
        raise
    main = getattr(mod, "main", None)
    if not callable(main):
        raise CLIError(f"proofs_checks.{name} has no main(argv) function")
    try:
        rc = main(argv)
    except SystemExit as e:  # a check that calls sys.exit / argparse errors
        rc = e.code
    if rc is None:
        return 0
    return rc if isinstance(rc, int) else 1


def _known_checks() -> tuple[str, ...]:
    return _names_from("proofs_checks", ("CHECKS",), CHECKS)


def cmd_check(args, extra: list[str]) -> int:
    # A name outside the list still runs if proofs_checks.<name> exists (checks added later).
    names = list(_known_checks()) if args.name == "all" else [args.name]
    rest = list(args.args) + list(extra)
    if len(names) > 1:
        # one output folder per check: rewrite --out DIR into DIR/<name>
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--out", default=None)
        known, rest = pre.parse_known_args(rest)
    worst = 0
    for name in names:
        argv = list(rest)
        if len(names) > 1 and known.out is not None:
            argv += ["--out", str(Path(known.out) / name)]
        if len(names) > 1:
            print(f"== check {name}", flush=True)
        rc = _run_check(name, argv)
        if len(names) > 1:
            print(f"== check {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
        worst = worst or rc
    return worst


def cmd_bench(args, extra: list[str]) -> int:
    from .benchmarks import BENCHMARKS

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
        rc = main_fn([*args.args, *extra])
    except SystemExit as e:  # argparse --help / errors inside the benchmark
        rc = e.code
    return 0 if rc is None else (rc if isinstance(rc, int) else 1)


# ------------------------------------------------------------------------------------ entry point
def _explicit_dests(parser: argparse.ArgumentParser, command: str, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option spelled out in ``argv`` for ``command`` (abbreviations are off)."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = subs.choices[command]._option_string_actions
    out = set()
    for tok in argv:
        if tok.startswith("--"):
            a = actions.get(tok.split("=", 1)[0])
            if a is not None:
                out.add(a.dest)
    return out


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tucker-manifold``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # check / bench pass unknown options on to the script they run.
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in ("check", "bench"):
            parser.parse_args(argv)  # reports the unknown arguments the usual way
    except SystemExit as e:
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 2)
    if args.command is None:
        parser.print_help()
        return 2
    args._explicit = _explicit_dests(parser, args.command, argv)
    debug = os.environ.get("TUCKER_MANIFOLD_DEBUG", "") not in ("", "0")
    threads = getattr(args, "threads", None)
    old_threads = None
    try:
        if threads:
            import torch

            old_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        if args.command in ("check", "bench"):
            return args.func(args, extra)
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
        if old_threads is not None:  # main() may run in-process (tests, notebooks): leave no trace
            import torch

            torch.set_num_threads(old_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
