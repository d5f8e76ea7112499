"""The theorem checks of proofs_checks/ run (quick settings) and report passing verdicts."""
import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

pytestmark = pytest.mark.slow


def _run(name, tmp_path):
    import importlib

    mod = importlib.import_module(f"proofs_checks.{name}")
    rc = mod.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / f"{name}.json").read_text())
    png = tmp_path / f"{name}.png"
    assert png.exists() and 0 < png.stat().st_size < 150_000
    assert (tmp_path / f"{name}.csv").exists()
    return rc, record


def _verdict(record, prefix):
    hits = [v for v in record["verdicts"] if v["name"].startswith(prefix)]
    assert hits, f"no verdict starting with {prefix!r}"
    return hits


def test_check_names_registered():
    from proofs_checks import CHECKS

    assert {"descent", "convergence", "approximation"} <= set(CHECKS)


def test_descent_quick(tmp_path):
    pytest.importorskip("sklearn")
    rc, record = _run("descent", tmp_path)
    assert rc == 0 and record["passed"]
    for v in record["verdicts"]:
        assert v["passed"], v
        if "descent bound" in v["name"] or "monotone" in v["name"] or ">=" in v["name"]:
            assert v["worst_slack"] <= 0, v
    problems = {r["problem"] for r in record["rows"]}
    assert problems == {"quadratic", "regression", "cnn_digits"}
    # tau = 0 and tau > 0, h = 1/L and 0.5/L for every problem
    assert {(r["tau"] > 0, r["h_L"]) for r in record["rows"]} == {(False, 1.0), (False, 0.5), (True, 1.0), (True, 0.5)}
    for r in record["rows"]:
        assert r["worst_slack_P"] <= 0 and r["worst_slack_core"] <= 0
        assert r["loss_T"] < r["loss_0"]


def test_convergence_quick(tmp_path):
    rc, record = _run("convergence", tmp_path)
    assert rc == 0 and record["passed"]
    (bound,) = _verdict(record, "bound:")
    assert bound["worst_slack"] <= 0
    d = bound["details"]
    assert d["final_wavg"] <= d["final_rhs"]
    (contrast,) = _verdict(record, "contrast:")
    assert contrast["details"]["ratio"] > 5


def test_approximation_quick(tmp_path):
    rc, record = _run("approximation", tmp_path)
    assert rc == 0 and record["passed"]
    for part, slope in record["slopes"].items():
        assert 0.7 <= slope <= 1.4, (part, slope)
    rob = record["robustness"]
    errs = [r["tdlrt"] for r in rob]
    assert max(errs[1:]) <= 2 * min(errs[1:])
    tiny = [r for r in rob if r["sigma_min"] <= 1.01e-5]
    for r in tiny:
        kl = r["koch_lubich"]
        assert (isinstance(kl, str) or not math.isfinite(kl)) or kl > 10 * r["tdlrt"]


def test_tau_zero_keeps_points_on_the_manifold():
    """Regression test for a library fix found by the descent check: with tau = 0 the truncation kept
    rounding-level singular values, so once the exact rank was reached the stored point had a numerically
    rank-deficient core (off the manifold; inverse-Gram maps at it blow up)."""
    import geoopt
    import torch

    from tucker_manifold import FixedRankTucker
    from tucker_manifold.optim import TDLRT

    g = torch.Generator().manual_seed(0)
    target = FixedRankTucker((8, 7, 6), (3, 3, 3))
    a = target.to_dense(target.random(dtype=torch.float64, generator=g))
    m = FixedRankTucker((8, 7, 6), (2, 2, 2))
    p = geoopt.ManifoldParameter(m.random(dtype=torch.float64, generator=g), manifold=m)
    opt = TDLRT([p], lr=1.0, tau=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
        assert p.manifold.check_point_on_manifold(p.detach())
    assert p.manifold.ranks == (3, 3, 3)
    assert float(((p.manifold.to_dense(p.detach()) - a) ** 2).sum()) < 1e-20
