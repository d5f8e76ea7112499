"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/budget_gap.py`` (installed with the package, so
``tucker-manifold bench budget_gap`` runs it too). Options: ``python benchmarks/budget_gap.py --help``."""
import sys

from tucker_manifold.benchmarks.budget_gap import main

if __name__ == "__main__":
    sys.exit(main())
