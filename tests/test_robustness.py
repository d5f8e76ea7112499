"""The Figure-2 robustness check (proofs_checks/robustness.py) end to end in its quick setting.

Needs scikit-learn (the quick run uses sklearn's digits) and matplotlib (the plot); about 20 s on 2 shared
cores (the quick run itself: 16x16 digits, 2 q x 2 seeds x 4 methods).
"""
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from proofs_checks import robustness  # noqa: E402


def test_spread_definition():
    assert robustness.spread([1.0, 1.0, 1.0]) == 0.0
    assert robustness.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert robustness.spread([1.0, float("inf")]) == math.inf
    assert robustness.spread([1.0, float("nan")]) == math.inf


def test_decaying_cp_init_has_requested_weights_and_norm():
    import torch

    layer = robustness.CPConv2d(20, 50, 5, rank=6)
    robustness.cp_decaying_(layer, 0.1, torch.Generator().manual_seed(0))
    norms = torch.stack([f.detach().double().norm(dim=0) for f in layer.factors]).prod(0)  # lam_k
    ratios = norms[1:] / norms[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.1), rtol=1e-4)
    # the reconstructed kernel has PyTorch's default-init norm sqrt(prod(n) / (3 fan_in))
    target = math.sqrt(50 * 20 * 25 / (3 * 20 * 25))
    assert float(layer.weight.detach().norm()) == pytest.approx(target, rel=1e-4)


def test_tucker_methods_share_the_initial_weights():
    import torch

    a = robustness.build_model("tdlrt", 0.01, 3, 1, 16)
    b = robustness.build_model("vanilla", 0.01, 3, 1, 16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_quick_run_passes_and_writes_verdicts(tmp_path):
    rc = robustness.main(["--quick", "--out", str(tmp_path)])
    assert rc == 0
    rec = json.loads((tmp_path / "robustness.json").read_text())
    assert rec["check"] == "robustness" and rec["passed"] is True
    names = {v["name"]: v for v in rec["verdicts"]}
    assert set(names) == {"tdlrt_finite", "tdlrt_spread", "tdlrt_worst_below_baselines", "tdlrt_tracks_dense"}
    assert all(v["passed"] for v in names.values())
    spread = names["tdlrt_spread"]["details"]["spread"]
    assert spread == rec["spreads"]["tdlrt"] and spread <= rec["settings"]["spread_max"]
    gap = names["tdlrt_tracks_dense"]["details"]["max_rel_gap"]
    assert gap == rec["per_method"]["tdlrt"]["rel_gap_to_dense"] and gap <= rec["settings"]["gap_max"]
    for m in rec["settings"]["methods"]:
        assert m in rec["spreads"]
    assert len(rec["finals"]) == len(rec["settings"]["methods"]) * len(rec["settings"]["qs"]) * rec["settings"]["seeds"]
    for name in ("robustness.png", "robustness.csv", "robustness_summary.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "robustness.png").stat().st_size < 200_000
