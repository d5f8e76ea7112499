"""Run every check and write ONE markdown report: every verdict with its worst slack, the reported
figures, the plots, and the mutation table (every verdict against every broken integrator of
:mod:`proofs_checks.mutants`).

    python -m proofs_checks.report [--quick] [--out DIR] [--no-mutations] [--checks a,b] [--readme README]
    python -m proofs_checks.all ...                 # the same
    tucker-manifold check all ...                   # the same, through the CLI (also: check report)

Writes ``DIR/report.md`` and ``DIR/report.json``, and each check's own files into ``DIR/<check>/``
(default ``DIR = ./runs/checks/report``). The mutation table always uses the checks' quick settings (as
``tests/test_proofs_mutations.py`` does). Exit 0 iff every check passes and every expected mutant catch
happens.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Iterable, Mapping

from tucker_manifold.outputs import output_dir, write_json

from . import CHECKS
from .common import CheckResult, default_out, finish
from .mutants import EXPECTED_CAUGHT, MUTANTS

NAME = "report"

#: check -> the mutants run against it. A mutant is left out of a check whose claims it cannot violate
#: there (``momentum-reset`` outside robustness: the theorem checks use momentum 0, where it is TDLRT;
#: ``ignores-tau`` in robustness: a rank-1 network, measured n.a., left out for the test's time).
MUTANT_CHECKS: dict[str, list[str]] = {
    "descent": ["frozen", "fixed-basis", "too-long", "ignores-tau", "wrong-sign", "broken-lift", "vanilla",
                "factor-euler", "fixed-rank"],
    "convergence": ["frozen", "fixed-basis", "too-long", "ignores-tau", "wrong-sign", "broken-lift", "vanilla",
                    "fixed-rank"],
    "approximation": ["frozen", "fixed-basis", "too-long", "ignores-tau", "wrong-sign", "broken-lift", "vanilla",
                      "factor-euler", "fixed-rank"],
    "robustness": ["frozen", "fixed-basis", "momentum-reset", "vanilla"],
}


def check_module(name: str):
    return importlib.import_module(f"proofs_checks.{name}")


def run_mutations(checks: Iterable[str] | None = None, mutants: Mapping[str, list[str]] | None = None,
                  cache: dict | None = None, echo: bool = False) -> dict:
    """Quick setting of every check against the library's integrators and the mutants of ``mutants``
    (default :data:`MUTANT_CHECKS`). Returns ``{check: {optimizer: [verdict dicts]}}``; the check's own
    optimizers (``tdlrt``) come first."""
    import contextlib
    import io

    cache = {} if cache is None else cache
    mutants = dict(MUTANT_CHECKS if mutants is None else mutants)
    table: dict = {}
    for check in (checks or CHECKS):
        mod = check_module(check)
        table[check] = {}
        runs = [(None, None)] + [(m, {m: MUTANTS[m][0]}) for m in mutants.get(check, [])]
        for mname, opts in runs:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                res: CheckResult = mod.run(quick=True, optimizers=opts, cache=cache, plots=False)
            for v in res.verdicts:
                table[check].setdefault(v.optimizer, []).append(v.to_dict())
            if echo:
                print(f"  mutations: {check} / {mname or 'default'}: {sum(not v.passed for v in res.verdicts)} of "
                      f"{len(res.verdicts)} verdicts fail ({time.perf_counter() - t0:.1f}s)", flush=True)
    return table


def library_integrators(per_opt: Mapping[str, list]) -> list[str]:
    """The columns of a check's table that are the library's integrators (``tdlrt`` first), not mutants."""
    return [o for o in per_opt if o not in MUTANTS]


def cell(check: str, mutant: str, verdict: dict | None, reference_passed: bool = True) -> str:
    """``caught`` (the verdict failed), ``fails (so does tdlrt)`` (it failed, but so did the library's
    integrator: nothing is shown), ``NOT CAUGHT`` (it passed although listed in EXPECTED_CAUGHT), ``n.a.``
    (it passed and the mutant does not violate its claim, or it did not count: vacuous), ``-`` (not run)."""
    if verdict is None:
        return "-"
    if not verdict["passed"]:
        return "caught" if reference_passed else "fails (so does tdlrt)"
    if verdict["name"] in EXPECTED_CAUGHT.get(check, {}).get(mutant, []):
        return "NOT CAUGHT"
    return "n.a. (not counted)" if not verdict.get("counted", True) else "n.a."


def expectation_failures(table: dict) -> list[str]:
    """Every expected catch that did not happen, and every failing verdict of the library's integrators."""
    bad = []
    for check, per_opt in table.items():
        for lib in library_integrators(per_opt):
            bad += [f"{check}: {lib} fails {v['name']}" for v in per_opt[lib] if not v["passed"]]
        for mutant, names in EXPECTED_CAUGHT.get(check, {}).items():
            got = {v["name"]: v for v in per_opt.get(mutant, [])}
            for name in names:
                if name not in got:
                    bad.append(f"{check}: {mutant} was not run against {name}")
                elif got[name]["passed"]:
                    bad.append(f"{check}: {name} passed on {mutant}")
    return bad


def _lib_cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return ("pass" if v["passed"] else "**FAIL**") + ("" if v.get("counted", True) else " (not counted)")


def mutation_markdown(table: dict, reference: str = "tdlrt") -> str:
    lines = ["Cells: **caught** = the verdict fails on that mutant; **fails (so does tdlrt)** = it fails, but so "
             "does the library's integrator, so the cell shows nothing; **n.a.** = it passes and the mutant does "
             "not violate its claim (for example a 3x step in Theorem 3.2, which is still a convergent SGD); "
             "**NOT CAUGHT** = it passes although the mutant violates its claim; `-` = not run. "
             f"The first columns are the library's integrators ({reference} first; `tdlrt-parallel` = "
             "ParallelTDLRT where the check runs it), which must pass. Quick settings.", ""]
    for check, per_opt in table.items():
        names = [v["name"] for v in per_opt.get(reference, [])]
        libs = [reference] + [o for o in library_integrators(per_opt) if o != reference]
        muts = [m for m in per_opt if m not in libs]
        lines += [f"**{check}**", "", "| verdict | " + " | ".join(libs + muts) + " |",
                  "|---|" + "---|" * (len(libs) + len(muts))]
        for name in names:
            ref = next(v for v in per_opt[reference] if v["name"] == name)
            row = [_lib_cell(next((v for v in per_opt[o] if v["name"] == name), None)) for o in libs]
            for m in muts:
                row.append(cell(check, m, next((v for v in per_opt[m] if v["name"] == name), None), ref["passed"]))
            lines.append(f"| `{name}` | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Mutants:", ""] + [f"- `{m}`: {what}" for m, (_, what) in MUTANTS.items()]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in x) + ")"
    return str(x)


def check_markdown(res: CheckResult, rel: str) -> str:
    lines = [f"## {res.name} ({'PASS' if res.passed else 'FAIL'}; {res.runtime_s:.0f} s wall, {res.cpu_s:.0f} s CPU)", "",
             "| integrator | verdict | what it computes | result | worst slack |", "|---|---|---|---|---|"]
    for v in res.verdicts:
        result = ("pass" if v.passed else "**FAIL**") if v.counted else "not counted"
        slack = "-" if v.worst_slack is None else _fmt(v.worst_slack)
        lines.append(f"| {v.optimizer} | `{v.name}` | {v.claim} | {result} | {slack} |")
    if res.reported:
        lines += ["", "Reported figures (not verdicts):", ""]
        lines += [f"- `{r['name']}` = {_fmt(r['value'])}: {r.get('note', '')}" for r in res.reported]
    if res.markdown:
        lines += ["", res.markdown.rstrip()]
    lines += ["", f"![{res.name}]({rel}/{res.name}.png)", ""]
    return "\n".join(lines)


#: the markers of the mutation table's copy in proofs_checks/README.md
README_BEGIN = "<!-- mutation-table:begin (copied from results/report.md: python -m proofs_checks.report --readme) -->"
README_END = "<!-- mutation-table:end -->"


def mutation_section(report_md: str) -> str:
    """The mutation-table section of a report (after its ``## Mutation table`` heading, up to the next
    ``## `` heading or the end), stripped."""
    head = "## Mutation table\n"
    if head not in report_md:
        raise ValueError("the report has no mutation table (written with --no-mutations?)")
    rest = report_md.split(head, 1)[1]
    return rest.split("\n## ", 1)[0].strip()


def readme_section(readme: str) -> str:
    """The text between :data:`README_BEGIN` and :data:`README_END`, stripped."""
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError("no mutation-table markers in the README")
    return readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()


def sync_readme(report_md: str | Path, readme: str | Path) -> None:
    """Copy the mutation table of the report ``report_md`` into ``readme``, between the markers."""
    table = mutation_section(Path(report_md).read_text())
    text = Path(readme).read_text()
    readme_section(text)  # the markers are there
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    Path(readme).write_text(f"{before}{README_BEGIN}\n\n{table}\n\n{README_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proofs_checks.report",
                                     description="Run every check and write one markdown report (with the mutation table)")
    parser.add_argument("--quick", action="store_true", help="quick settings of every check (the test suite's)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out(NAME)})")
    parser.add_argument("--no-mutations", action="store_true", help="skip the mutation table")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks (default: all)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also copy the mutation table into this README, between its mutation-table markers "
                             "(proofs_checks/README.md for the committed copy)")
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown check(s) {unknown}; valid: {list(CHECKS)}")
    out = output_dir(args.out if args.out is not None else default_out(NAME))
    t0 = time.perf_counter()
    results, codes = {}, {}
    for name in checks:
        print(f"== check {name}", flush=True)
        res = check_module(name).run(quick=args.quick)
        codes[name] = finish(res, out / name, args.quick)
        results[name] = res
    table = {}
    bad: list[str] = []
    c1 = time.process_time()
    if not args.no_mutations:
        print("== mutation table (quick settings)", flush=True)
        table = run_mutations(checks, echo=True)
        bad = expectation_failures(table)
    total, cpu_mut = time.perf_counter() - t0, time.process_time() - c1
    ok = all(c == 0 for c in codes.values()) and not bad
    md = [f"# proofs_checks report ({'quick' if args.quick else 'full'} settings)", "",
          f"Every check of `proofs_checks` ({', '.join(checks)}) and the mutation table; "
          f"{'PASS' if ok else 'FAIL'}; {total:.0f} s in all. Regenerate with "
          f"`python -m proofs_checks.report{' --quick' if args.quick else ''} --out DIR`. "
          "For `lhs <= rhs` the worst slack is the largest `lhs - rhs` (<= 0 holds); each verdict's JSON "
          "says its sign convention. Forms checked and constants: `proofs_checks/README.md`.", "",
          "| check | result | wall | CPU (1 thread) |", "|---|---|---|---|"]
    md += [f"| {n} | {'PASS' if r.passed else 'FAIL'} | {r.runtime_s:.0f} s | {r.cpu_s:.0f} s |" for n, r in results.items()]
    md.append("")
    md += [check_markdown(r, n) for n, r in results.items()]
    if table:
        md += ["## Mutation table", "", f"Quick settings, {cpu_mut:.0f} s CPU.", "", mutation_markdown(table)]
        if bad:
            md += ["Expected catches that did not happen:", ""] + [f"- {b}" for b in bad] + [""]
    (out / "report.md").write_text("\n".join(md))
    if args.readme is not None and table:
        sync_readme(out / "report.md", args.readme)
        print(f"mutation table copied into {args.readme}", flush=True)
    slim = {c: {o: [{k: v[k] for k in ("name", "passed", "counted", "worst_slack")} for v in vs]
                for o, vs in per.items()} for c, per in table.items()}
    write_json(out / "report.json", {"passed": ok, "quick": args.quick, "runtime_s": total,
                                     "checks": {n: c == 0 for n, c in codes.items()}, "mutations": slim,
                                     "expectation_failures": bad})
    print(f"report: {'PASS' if ok else 'FAIL'} -> {out / 'report.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
