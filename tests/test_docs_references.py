"""Every maths note the code cites is in the repository: each ``docs/<file>.md`` (and ``§N``) reference in
tucker_manifold/, proofs_checks/, tests/ and examples/ names an existing file and section of docs/, no file
there still cites the research notes that live outside the repository, the cross-references inside docs/
resolve, and every name of the API contract in docs/api.md exists in the code. Each checker is also run on
broken input, which it must flag."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("tucker_manifold", "proofs_checks", "tests", "examples")
SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cfg"}

_NUM = r"\d+(?:\.\d+)*"
#: ``§2``, ``§1-4``, ``§2, §5``, ``§5-6`` after a file name
_SECTIONS = rf"(?P<sec>\s*§\s*{_NUM}(?:\s*[-–]\s*{_NUM})?(?:\s*,\s*§?\s*{_NUM}(?:\s*[-–]\s*{_NUM})?)*)?"
CODE_REF = re.compile(rf"docs/(?P<file>[A-Za-z0-9_.-]+\.md){_SECTIONS}")
#: inside docs/: a markdown link to a sibling note, optionally followed by sections
DOCS_REF = re.compile(rf"\]\((?P<file>[A-Za-z0-9_.-]+\.md)(?:#[^)]*)?\){_SECTIONS}")
_HEADING = re.compile(rf"^#{{2,4}}\s+(?P<num>{_NUM})\.?\s", re.M)

#: Files that are not in this repository (the project's external research notes and design draft). The
#: patterns are assembled so that this file does not match them itself.
FORBIDDEN = {
    "research" + "/": re.compile(r"(?<![\w.-])" + "research" + r"/"),
    "DESIGN" + ".md": re.compile(r"\b" + "DESIGN" + r"\.md"),
    "paper" + ".md": re.compile(r"(?<![\w-])" + "paper" + r"\.md"),
    "parallel" + ".md": re.compile(r"(?<![\w-])" + "parallel" + r"\.md"),
    "ecosystem" + ".md": re.compile(r"(?<![\w-])" + "ecosystem" + r"\.md"),
}


def sections_of(text: str) -> set[str]:
    """Section numbers (``"2"``, ``"4.1"``) of the numbered headings of a note."""
    return {m.group("num") for m in _HEADING.finditer(text)}


def cited_sections(spec: str | None) -> list[str]:
    """``" §1-4, §6"`` -> ``["1", "4", "6"]`` (the ends of each range)."""
    return re.findall(_NUM, spec or "")


def broken_references(text: str, pattern: re.Pattern, docs: Path) -> list[str]:
    """The references in ``text`` to a missing note or to a section the note does not have."""
    bad = []
    for m in pattern.finditer(text):
        path = docs / m.group("file")
        if not path.is_file():
            bad.append(f"{m.group(0).strip()}: no file docs/{m.group('file')}")
            continue
        have = sections_of(path.read_text(encoding="utf-8"))
        missing = [s for s in cited_sections(m.group("sec")) if s not in have]
        if missing:
            bad.append(f"{m.group(0).strip()}: docs/{m.group('file')} has no section {', '.join(missing)}")
    return bad


def forbidden_citations(text: str) -> list[str]:
    return [name for name, pat in FORBIDDEN.items() if pat.search(text)]


def _scanned_files() -> list[Path]:
    this = Path(__file__).resolve()
    out = []
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts and p.resolve() != this:
                out.append(p)
    return out


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ------------------------------------------------------------------------------------ the code's citations
def test_every_docs_reference_in_the_code_resolves():
    files = _scanned_files()
    assert len(files) > 20  # the scan sees the tree
    bad = {}
    n_refs = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        n_refs += len(CODE_REF.findall(text))
        problems = broken_references(text, CODE_REF, DOCS)
        if problems:
            bad[_rel(p)] = problems
    assert not bad, bad
    assert n_refs >= 10  # the code does cite the notes (flow, onepass, proofs_checks, tests)


def test_no_citation_of_notes_outside_the_repository():
    bad = {_rel(p): found for p in _scanned_files()
           if (found := forbidden_citations(p.read_text(encoding="utf-8", errors="replace")))}
    assert not bad, f"cite docs/<file>.md instead: {bad}"


def test_cross_references_inside_docs_resolve():
    notes = sorted(DOCS.glob("*.md"))
    assert {p.name for p in notes} >= {"README.md", "geometry.md", "tdlrt.md", "one_pass.md", "theorems.md",
                                       "budget.md", "api.md"}
    bad = {p.name: probs for p in notes
           if (probs := broken_references(p.read_text(encoding="utf-8"), DOCS_REF, DOCS))}
    assert not bad, bad
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    unlisted = [p.name for p in notes if p.name != "README.md" and f"]({p.name})" not in index]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


def test_cited_notes_have_numbered_sections():
    # a section reference can only resolve against numbered headings
    for name in ("geometry.md", "tdlrt.md", "one_pass.md", "theorems.md", "budget.md"):
        assert {"1", "2", "3"} <= sections_of((DOCS / name).read_text(encoding="utf-8")), name


def test_checkers_flag_broken_input(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## 1. One\n\n### 1.2 Sub\n\n## 3. Three\n", encoding="utf-8")
    d = "docs" + "/"
    ok = f"see {d}a.md §1, {d}a.md §1.2 and {d}a.md §1-3, also {d}a.md"
    assert broken_references(ok, CODE_REF, tmp_path) == []
    assert cited_sections(" §1-3, §5") == ["1", "3", "5"]
    for text in (f"{d}b.md", f"{d}a.md §2", f"{d}a.md §1-4", f"{d}a.md §1, §7", f"{d}a.md §1.3"):
        assert len(broken_references(text, CODE_REF, tmp_path)) == 1, text
    assert broken_references("[x](a.md) §3 and [y](a.md#one)", DOCS_REF, tmp_path) == []
    assert len(broken_references("[x](a.md) §2 and [y](c.md)", DOCS_REF, tmp_path)) == 2
    for name in FORBIDDEN:
        assert forbidden_citations(f"Notation (see {name} §1)") == [name]
    assert forbidden_citations("https://www.research.ed.ac.uk/en/ and docs/one_pass.md §3") == []


# ------------------------------------------------------------------------------------ docs/api.md
def _api_names() -> list[str]:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^\|\s*`([^`]+)`\s*\|", text, re.M)


def _resolve_tm(path: str):
    """``"nn.TuckerConv2d.from_dense"`` -> the object, importing submodules of tucker_manifold as needed."""
    obj = importlib.import_module("tucker_manifold")
    for part in path.split("."):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.ismodule(obj):
            obj = importlib.import_module(f"{obj.__name__}.{part}")  # ModuleNotFoundError if absent
        else:
            raise AttributeError(f"{obj!r} has no attribute {part!r}")
    return obj


def _cli_commands() -> set[str]:
    import argparse

    from tucker_manifold.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {c for a in actions for c in a.choices}


def check_api_name(name: str) -> None:
    """Raise unless ``name`` (a first-column entry of docs/api.md) exists in the code."""
    if m := re.fullmatch(r"tm\.([\w.]+)(?:\((.*)\))?", name):
        obj = _resolve_tm(m.group(1))
        kwargs = re.findall(r"(\w+)=", m.group(2) or "")
        if kwargs:
            params = inspect.signature(obj).parameters
            absent = [k for k in kwargs if k not in params]
            if absent:
                raise AttributeError(f"{m.group(1)} takes no argument {absent}")
        return
    if m := re.fullmatch(r"M\.(\w+)", name):
        from tucker_manifold import FixedRankTucker

        if not hasattr(FixedRankTucker((4, 3, 2), (2, 2, 2)), m.group(1)):
            raise AttributeError(f"FixedRankTucker has no {m.group(1)!r}")
        return
    if m := re.fullmatch(r"tucker-manifold (\w+)", name):
        if m.group(1) not in _cli_commands():
            raise AttributeError(f"no command {m.group(1)!r}")
        return
    if m := re.fullmatch(r"--method ([\w-]+)", name):
        from tucker_manifold.experiments.methods import method_names

        if m.group(1) not in method_names():
            raise AttributeError(f"no method {m.group(1)!r}")
        return
    raise ValueError(f"docs/api.md: cannot check {name!r} (write tm.…, M.…, 'tucker-manifold CMD' or '--method NAME')")


def test_every_api_name_exists():
    names = _api_names()
    assert len(names) > 60
    bad = {}
    for name in names:
        try:
            check_api_name(name)
        except (AttributeError, ImportError, ValueError) as e:
            bad[name] = str(e)
    assert not bad, bad


@pytest.mark.parametrize("name", [
    "tm.nn.does_not_exist", "tm.optim.TDLRT(no_such_option=)", "tm.no_module.thing", "M.no_method",
    "tucker-manifold finetune-everything", "--method no-such-method", "tucker_manifold.nn.tuckerize",
])
def test_api_checker_flags_missing_names(name):
    with pytest.raises((AttributeError, ImportError, ValueError)):
        check_api_name(name)
