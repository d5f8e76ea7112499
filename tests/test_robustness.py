"""The Figure-2 robustness check (proofs_checks/robustness.py) end to end in its quick setting.

Needs scikit-learn (the quick run uses sklearn's digits) and matplotlib (the plot). The quick run itself:
16x16 digits, q in {1, 0.001}, 2 seeds, TDLRT, ParallelTDLRT and vanilla Tucker at 20% of the channels.
"""
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from proofs_checks import robustness  # noqa: E402


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


def test_tucker_and_dense_models_start_from_the_same_function():
    import torch

    a = robustness.build_model("tucker", 0.01, 3, 1, 16)
    b = robustness.build_model("tucker", 0.01, 3, 1, 16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    d = robustness.build_model("dense", 0.01, 3, 1, 16)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a(x), d(x), atol=1e-5)
    # low rank: 20% of the channels, so augmented bases (at most twice the rank) stay below full
    for idx, (ranks, _) in robustness.LAYER_RANKS.items():
        n = a.features[idx].tucker_weight.manifold.shape
        assert all(2 * r < m for r, m in zip(ranks[:2], n[:2]) if m > 1)


def test_quick_run_writes_verdicts_and_keeps_augmented_ranks_below_full(tmp_path):
    rc = robustness.main(["--quick", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "robustness.json").read_text())
    assert rec["check"] == "robustness" and rc == 0 and rec["passed"]
    checked = list(robustness.CHECKED)
    assert checked == ["tdlrt", "tdlrt-parallel"] and rec["optimizers"] == checked
    # one verdict per integrator, q_drop; both library integrators pass it
    assert sorted((v["optimizer"], v["name"]) for v in rec["verdicts"]) == [(o, "q_drop") for o in checked]
    assert all(v["passed"] for v in rec["verdicts"])
    reported = {r["name"]: r for r in rec["reported"]}
    n_pairs = len(rec["settings"]["qs"]) * rec["settings"]["seeds"]
    for o in checked:
        assert reported[f"{o}:setup_augmented_below_full"]["value"] is True
        assert reported[f"{o}:finite"]["value"] is True
        # the paper's claim against vanilla is a reported figure with the measured losses
        every = reported[f"{o}:paper_claim.below_vanilla_every_pair"]
        assert len(every["losses"]) == n_pairs and every["pairs"] == n_pairs
        below = sum(x["loss"] < x["loss_vanilla"] for x in every["losses"].values())
        assert every["pairs_below"] == below
        assert every["value"] == ("reproduced" if below == n_pairs else "not reproduced here")
        mean = reported[f"{o}:paper_claim.below_vanilla_mean"]
        assert mean["value"] == ("reproduced" if mean["mean_loss"] < mean["mean_loss_vanilla"] else "not reproduced here")
    full = rec["full_ranks"]
    for o in checked:
        for aug in rec["augmented_ranks"][o].values():
            for a, f in zip(aug, full):
                assert a[0] < f[0] and (f[1] == 1 or a[1] < f[1])
    n_methods = len(checked) + len(rec["settings"]["baselines"])
    assert len(rec["finals"]) == n_methods * n_pairs
    for name in ("robustness.png", "robustness.csv", "robustness_summary.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "robustness.png").stat().st_size < 200_000


def test_claim_table_lists_every_pair_and_integrator():
    runs = {(m, q, s): {"train_loss": [2.0, loss]} for m, q, s, loss in [
        ("tdlrt", 1.0, 0, 0.3), ("tdlrt", 0.1, 0, 0.1), ("vanilla", 1.0, 0, 0.2), ("vanilla", 0.1, 0, float("inf"))]}
    md = robustness.claim_markdown(runs, {"tdlrt": "tdlrt"}, [1.0, 0.1], [0])
    assert "| 1.0 | 0 | 0.3000 (>=) | 0.2000 |" in md and "| 0.1 | 0 | 0.1000 (<) | inf |" in md
    assert "below vanilla in 1 of 2 pairs" in md and "**not reproduced here**" in md
    rep = {r["name"]: r["value"] for r in robustness.paper_claim("tdlrt", runs, [1.0, 0.1], [0])}
    assert rep == {"tdlrt:paper_claim.below_vanilla_every_pair": "not reproduced here",
                   "tdlrt:paper_claim.below_vanilla_mean": "reproduced"}
