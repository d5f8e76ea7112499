"""The theorem checks of proofs_checks/ run (quick settings), write their files, and report passing verdicts
and sane set-up figures. That each verdict can also FAIL is tests/test_proofs_mutations.py's job."""
import json
import math
from pathlib import Path

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
    for v in record["verdicts"]:
        assert v["claim"] and v["optimizer"] in ("tdlrt", "tdlrt-parallel"), v
    assert record["verdicts"][0]["optimizer"] == "tdlrt"
    return rc, record


def _verdicts(record, optimizer="tdlrt"):
    return {v["name"]: v for v in record["verdicts"] if v["optimizer"] == optimizer}


def _reported(record):
    return {r["name"]: r["value"] for r in record["reported"]}


def test_check_names_registered():
    from proofs_checks import CHECKS

    assert {"descent", "convergence", "approximation", "robustness"} <= set(CHECKS)


def test_default_output_is_runs_checks_name(tmp_path, monkeypatch):
    """Nothing lands in the package by default: ./runs/checks/<name> relative to the working directory."""
    from proofs_checks.common import CheckResult, Verdict, base_parser, default_out, finish

    assert default_out("descent") == Path("runs") / "checks" / "descent"
    assert base_parser("descent", "x").parse_args([]).out is None
    monkeypatch.chdir(tmp_path)
    rc = finish(CheckResult("dummy", [Verdict("v", True, -1.0, claim="c")]), None, quick=True)
    assert rc == 0 and (tmp_path / "runs" / "checks" / "dummy" / "dummy.json").exists()
    rc = finish(CheckResult("dummy", [Verdict("v", False, 1.0, claim="c")]), None, quick=True)
    assert rc == 1


def test_descent_quick(tmp_path):
    pytest.importorskip("sklearn")
    rc, record = _run("descent", tmp_path)
    assert rc == 0 and record["passed"]
    assert record["optimizers"] == ["tdlrt", "tdlrt-parallel"]  # ParallelTDLRT checked next to TDLRT
    problems = {r["problem"] for r in record["rows"]}
    assert problems == {"quadratic", "regression", "lyapunov", "cnn_digits"}
    rep = _reported(record)
    for o in record["optimizers"]:
        verdicts = _verdicts(record, o)
        assert len(verdicts) == 3 * len(problems)
        for p in problems:
            assert verdicts[f"{p}.bound@tau=0"]["worst_slack"] <= 0
            assert verdicts[f"{p}.truncation"]["worst_slack"] <= 0
            tp = verdicts[f"{p}.bound@tau>0"]
            # counted exactly when some tau > 0 run is non-vacuous on at least half of its steps
            fracs = [r["frac_nonvacuous"] for r in record["rows"]
                     if r["problem"] == p and r["tau"] > 0 and r["optimizer"] == o]
            assert tp["counted"] == any(f >= 0.5 for f in fracs)
            if tp["counted"]:
                assert tp["worst_slack"] <= 0
        # the tau > 0 bound says something on at least two problems
        assert sum(verdicts[f"{p}.bound@tau>0"]["counted"] for p in problems) >= 2
        for p in problems:
            assert rep[f"{o}:{p}.core_ge_P"] <= 0  # the augmented space contains P grad L
            eta_dev, cg_dev = rep[f"{o}:{p}.last_step_info_dev"]
            assert eta_dev < 1e-8 and cg_dev < 1e-8  # the optimizer's own report matches the recomputation
    for p in problems:
        # ParallelTDLRT is checked against its own step: it is not TDLRT's Galerkin step
        assert rep[f"tdlrt-parallel:{p}.dist_to_galerkin@tau=0"] > 1e-6
        assert f"tdlrt:{p}.dist_to_galerkin@tau=0" not in rep
    for r in record["rows"]:
        assert r["loss_T"] < r["loss_0"]


def test_convergence_quick(tmp_path):
    rc, record = _run("convergence", tmp_path)
    assert rc == 0 and record["passed"]
    v = _verdicts(record)
    d = v["bound"]["details"]
    assert d["final_wavg"] <= d["final_rhs"]
    # the constants come from other seeds than the checked runs
    assert min(record["constants"]["seeds"]) >= 1000
    assert v["contrast"]["details"]["ratio"] > 5


def test_approximation_quick(tmp_path):
    rc, record = _run("approximation", tmp_path)
    assert rc == 0 and record["passed"]
    v = _verdicts(record)
    assert 0.7 <= v["slope_h"]["details"]["slope"] <= 1.4
    c1, c2, c3 = v["heldout_bound"]["details"]["c1_c2_c3"]
    assert c1 > 0 and c2 > 0 and c3 > 0  # every term of the bound is needed
    rep = _reported(record)
    assert rep["closed_form_vs_solve_ivp"] < 1e-7
    assert rep["tdlrt:max_normal_grad_over_eps"] <= 1 + 1e-8
    rob = record["robustness"]["tdlrt"]
    tiny = [r for r in rob if r["sigma_min"] <= 1.01e-5]
    for r in tiny:  # the sweep is stiff: explicit Euler on the factor ODEs blows up where TDLRT does not
        kl = r["koch_lubich"]
        assert (isinstance(kl, str) or not math.isfinite(kl)) or kl > 10 * r["integrator"]


def test_report_writes_one_markdown_file(tmp_path):
    pytest.importorskip("sklearn")
    from proofs_checks import report

    rc = report.main(["--quick", "--no-mutations", "--checks", "descent", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "report.md").read_text()
    assert "quadratic.bound@tau=0" in md and "](descent/descent.png)" in md
    assert (tmp_path / "descent" / "descent.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True


def test_mutation_markdown_cells():
    from proofs_checks import report

    v = lambda name, ok, counted=True: {"name": name, "passed": ok, "counted": counted}  # noqa: E731
    table = {"descent": {"tdlrt": [v("a", True), v("b", True)], "frozen": [v("a", False), v("b", True)]}}
    md = report.mutation_markdown(table)
    assert "| `a` | pass | caught |" in md and "| `b` | pass | " in md
    table["descent"]["tdlrt-parallel"] = [v("a", True), v("b", False)]
    md = report.mutation_markdown(table)
    assert "| verdict | tdlrt | tdlrt-parallel | frozen |" in md  # library integrators first, then mutants
    assert "| `a` | pass | pass | caught |" in md and "| `b` | pass | **FAIL** | n.a. |" in md
    assert "descent: tdlrt-parallel fails b" in report.expectation_failures(table)
    assert report.cell("descent", "frozen", None) == "-"
    assert report.cell("descent", "frozen", v("a", False), reference_passed=False) == "fails (so does tdlrt)"


def test_tau_zero_keeps_points_on_the_manifold():
    """Regression test for a library fix found by the descent check: with tau = 0 the truncation kept
    rounding-level singular values, so once the exact rank was reached the stored point had a numerically
    rank-deficient core (off the manifold; inverse-Gram maps at it blow up)."""
    import geoopt
    import torch

    from tucker_manifold import FixedRankTucker
    from tucker_manifold.optim import TDLRT
    from tucker_manifold.parameter import record_io

    g = torch.Generator().manual_seed(0)
    target = FixedRankTucker((8, 7, 6), (3, 3, 3))
    a = target.to_dense(target.random(dtype=torch.float64, generator=g))
    m = FixedRankTucker((8, 7, 6), (2, 2, 2))
    p = geoopt.ManifoldParameter(m.random(dtype=torch.float64, generator=g), manifold=m)
    opt = TDLRT([p], lr=1.0, tau=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((record_io(p, None, None, p.manifold.to_dense(p)) - a) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
        assert p.manifold.check_point_on_manifold(p.detach())
    assert p.manifold.ranks == (3, 3, 3)
    assert float(((p.manifold.to_dense(p.detach()) - a) ** 2).sum()) < 1e-20


def test_readme_mutation_table_is_the_committed_reports():
    """proofs_checks/README.md carries the mutation table of the committed report, verbatim."""
    from proofs_checks import report

    root = Path(__file__).resolve().parents[1] / "proofs_checks"
    committed = (root / "results" / "report.md").read_text()
    assert report.readme_section((root / "README.md").read_text()) == report.mutation_section(committed)
    rows = [line for line in report.mutation_section(committed).splitlines() if line.startswith("| `")]
    assert rows and not any("NOT CAUGHT" in r or "FAIL" in r for r in rows)  # every expected catch, no failure
    assert json.loads((root / "results" / "report.json").read_text())["passed"] is True


def test_sync_readme_replaces_only_the_marked_block(tmp_path):
    from proofs_checks import report

    rep = tmp_path / "report.md"
    rep.write_text("# r\n\n## a\n\nx\n\n## Mutation table\n\n| t | 1 |\n\n## later\n\ny\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nbottom\n")
    report.sync_readme(rep, readme)
    text = readme.read_text()
    assert report.readme_section(text) == "| t | 1 |" and text.startswith("top\n") and text.endswith("\nbottom\n")
    with pytest.raises(ValueError):
        report.readme_section("no markers")
