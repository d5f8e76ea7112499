"""Shapes and seeds shared by the geometry property tests (orders 2-5, small enough for dense checks)."""

SEEDS = [0, 1, 2]
CASES = [
    ((5, 4), (2, 2)),  # a matrix: both multilinear ranks are the matrix rank
    ((6, 5, 4), (3, 2, 3)),
    ((5, 4, 6, 3), (2, 3, 2, 3)),
    ((4, 3, 3, 2, 3), (2, 2, 3, 2, 2)),
    ((8, 8, 3, 3), (3, 3, 3, 3)),
]
CASE_IDS = ["x".join(map(str, s)) for s, _ in CASES]
