"""Benchmarks shipped with the package, so that ``tucker-manifold bench NAME`` works from an installed
wheel. Each is a module ``tucker_manifold.benchmarks.<name>`` with ``main(argv) -> int``; outputs go to
``./runs/bench/<name>`` unless ``--out DIR`` is given. The repository's ``benchmarks/<name>.py`` are
thin wrappers around these modules, and ``benchmarks/results/`` holds the committed reference figures
(regenerated only with an explicit ``--out benchmarks/results``).
"""

#: benchmark name -> what it measures
BENCHMARKS = {
    "step_time": "ms per training step and peak memory: dense, vanilla Tucker, geoopt fixed-rank, TDLRT",
    "geometry": "egrad2rgrad + retraction + transport in Tucker form vs the same on dense tensors",
    "forward_choice": "TuckerConv2d's factorized vs reconstructed forward, and whether 'auto' picks the faster",
    "ddp_scaling": "images/s with 1 vs N data-parallel CPU processes (gloo) and the share of step time in all-reduce",
    "gpu_step_time": "ms per step and peak GPU memory of dense / vanilla / TDLRT / ParallelTDLRT (exits 0 without CUDA)",
    "budget_gap": "gap of the rank allocation under a parameter budget (budget.allocate_ranks) to the brute-force optimum",
    "onepass_memory": "memory the one-pass TDLRT step's records (x, gy per layer) hold on top of a plain forward/backward",
}

__all__ = ["BENCHMARKS"]
