"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/geometry.py`` (installed with the package, so
``tucker-manifold bench geometry`` runs it too). Options: ``python benchmarks/geometry.py --help``."""
import sys

from tucker_manifold.benchmarks.geometry import main

if __name__ == "__main__":
    sys.exit(main())
