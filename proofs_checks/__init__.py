"""Numerical checks of the theorems of TDLRT (Zangrando et al., NeurIPS 2024), one script per theorem.

Each check is a module ``proofs_checks.<name>`` with ``run(quick, optimizers, cache, plots) -> CheckResult``
(the integrators checked are factories, so broken ones, :mod:`proofs_checks.mutants`, run through the same
code) and ``main(argv) -> int`` (0: every verdict holds, 1: one fails), runnable as
``python -m proofs_checks.<name> [--quick] [--out DIR]``. It prints a table and writes a JSON/CSV record and
a PNG plot into the output folder (default ``./runs/checks/<name>``; the committed reference results are
regenerated with ``--out proofs_checks/results/<name>``). ``python -m proofs_checks.report`` (or
``proofs_checks.all``) runs them all and writes one markdown report with the mutation table. See
``proofs_checks/README.md`` for the forms checked.
"""

#: check name -> what it checks
CHECKS = {
    "descent": "Thm 3.1, local descent: L(Y+) - L(Y) <= -h(1 - Lh/2)||P grad L||^2 + B eta per step",
    "convergence": "Thm 3.2, SGD with Robbins-Monro steps and summable tolerances: E||P grad L||^2 -> 0",
    "approximation": "Thm 3.3, ||W(t) - Y_k|| <= c1 eps + c2 h + c3 theta/h, and robustness to small singular values",
    "robustness": "Figure 2: TDLRT vs vanilla Tucker at low rank, ill-conditioned (q-decaying) initializations",
}

__all__ = ["CHECKS"]
