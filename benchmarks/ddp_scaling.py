"""Wrapper: the benchmark lives in ``tucker_manifold/benchmarks/ddp_scaling.py`` (installed with the package, so
``tucker-manifold bench ddp_scaling`` runs it too). Options: ``python benchmarks/ddp_scaling.py --help``."""
import sys

from tucker_manifold.benchmarks.ddp_scaling import main

if __name__ == "__main__":
    sys.exit(main())
