"""``python -m proofs_checks.all``: every check and one report (:func:`proofs_checks.report.main`)."""
from .report import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
