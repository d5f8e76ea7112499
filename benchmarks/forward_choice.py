"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/forward_choice.py`` (installed with the package, so
``tucker-manifold bench forward_choice`` runs it too). Options: ``python benchmarks/forward_choice.py --help``."""
import sys

from tucker_manifold.benchmarks.forward_choice import main

if __name__ == "__main__":
    sys.exit(main())
