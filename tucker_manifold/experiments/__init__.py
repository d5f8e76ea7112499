"""Training experiments: one loop for every method, so that comparisons are fair.

* :mod:`.config`: :class:`TrainConfig` and its defaults (the one set; the CLI reads them), presets;
* :mod:`.methods`: the method registry (:func:`register_method`, :func:`build_method`);
* :mod:`.loop`: :func:`train` / :func:`evaluate`;
* :mod:`.checkpoints`: safe checkpoints (safetensors + JSON) for bit-identical resumes;
* :mod:`.accounting`: ranks and conv weight counts of a model, rank matching between methods;
* :mod:`.reports`: metrics, CSV / markdown tables and plots (through :mod:`tucker_manifold.outputs`);
* :mod:`.runner`: :func:`run_experiment` (``tucker-manifold train``) and :func:`compare_methods`
  (``tucker-manifold compare``).

Initial ranks of TDLRT: the layers start at ``rank_fraction=0.5`` of the channels (HOSVD of the dense
initialisation, spatial modes full rank) unless ``rank`` / ``rank_fraction`` is given; the integrator
then both grows and shrinks the ranks, and ``tau`` sets where they settle. Starting at half rank keeps
the first (most expensive, augmented) steps cheaper than a full-rank start; on vgg-mnist / MNIST a 0.25
start reached the same accuracy and compression within run-to-run noise and was not faster overall.

Fairness: every method sees the same data order (the loader's generator is seeded by the run's seed),
the same loss, learning rate, momentum, schedule and epochs; BatchNorm statistics are updated once per
step also for TDLRT (whose closure runs twice). Library code reports through the
``tucker_manifold.experiments`` logger, never print.
"""
from .accounting import (
    conv_parameter_counts,
    layer_ranks,
    match_budget_ranks,
    match_tucker_rank_fraction,
    tucker_conv_count,
)
from .checkpoints import CHECKPOINT_NAME, Checkpoint, CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .config import (
    DEFAULT_COMPARE_METHODS,
    DEFAULT_COMPARE_TAUS,
    DEFAULTS,
    PRESETS,
    REFERENCE_METHOD,
    TrainConfig,
    resolve_device,
)
from .loop import evaluate, frozen_bn_stats, show_progress, train
from .methods import (
    DEFAULT_FIXED_RANK_FRACTION,
    DEFAULT_SPARSITY,
    DEFAULT_TDLRT_RANK_FRACTION,
    BuildOptions,
    Method,
    build_method,
    get_method,
    match_layer_budgets,
    match_rank_fraction,
    match_sparsity,
    match_tt_budgets,
    method_names,
    register_method,
    sgd,
)
from .reports import final_metrics, markdown_table, plot_accuracy_vs_compression, plot_ranks, summarize, write_results
from .runner import (
    RunResult,
    build_dense,
    compare_methods,
    load_data,
    prepare_batch,
    reference_method,
    run_experiment,
    seed_everything,
    setup_run,
)

__all__ = [
    "TrainConfig", "DEFAULTS", "PRESETS", "DEFAULT_COMPARE_METHODS", "DEFAULT_COMPARE_TAUS", "REFERENCE_METHOD",
    "resolve_device",
    "BuildOptions", "Method", "register_method", "get_method", "method_names", "build_method", "sgd",
    "match_rank_fraction", "match_layer_budgets", "DEFAULT_TDLRT_RANK_FRACTION", "DEFAULT_FIXED_RANK_FRACTION",
    "DEFAULT_SPARSITY", "match_sparsity", "match_tt_budgets",
    "train", "evaluate", "show_progress", "frozen_bn_stats",
    "CHECKPOINT_NAME", "Checkpoint", "CheckpointError", "save_checkpoint", "read_checkpoint", "load_checkpoint",
    "layer_ranks", "conv_parameter_counts", "tucker_conv_count", "match_tucker_rank_fraction",
    "match_budget_ranks",
    "final_metrics", "summarize", "markdown_table", "write_results", "plot_ranks", "plot_accuracy_vs_compression",
    "RunResult", "seed_everything", "load_data", "prepare_batch", "build_dense", "setup_run", "run_experiment", "compare_methods",
    "reference_method",
]
