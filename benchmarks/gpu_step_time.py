"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/gpu_step_time.py`` (installed with the package, so
``tucker-manifold bench gpu_step_time`` runs it too). Options: ``python benchmarks/gpu_step_time.py --help``."""
import sys

from tucker_manifold.benchmarks.gpu_step_time import main

if __name__ == "__main__":
    sys.exit(main())
