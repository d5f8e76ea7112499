"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/onepass_memory.py`` (installed with the package, so
``tucker-manifold bench onepass_memory`` runs it too). Options: ``python benchmarks/onepass_memory.py --help``."""
import sys

from tucker_manifold.benchmarks.onepass_memory import main

if __name__ == "__main__":
    sys.exit(main())
