"""Every document the code, the tests, the chart or the docs cite exists, and so does every
section they cite ("docs/CONTRACTS.md §3"): a reference to a file that is not in the repository
(as the contracts document once was) fails here instead of sending a reader nowhere.

A citation is a path ending in an upper-case Markdown name (README.md, docs/ARCHITECTURE.md),
resolved against the repository root or the citing file's directory; URLs are not citations.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("operator", "trainer_image", "tests", "charts", "examples", "bench", "docs")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".tpl", ".txt", ".toml", ".json", ""}
URL = re.compile(r"\w+://\S+")
CITATION = re.compile(r"((?:\.\.?/|[\w-]+/)*[A-Z][A-Z_]*\.md)(?:\s*§\s*(\w+))?")


def sources() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES]
    for top in SCANNED_DIRS:
        files += [
            p
            for p in (REPO / top).rglob("*")
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return files


def citations() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in sources():
        text = URL.sub("", path.read_text(encoding="utf-8", errors="replace"))
        found += [(path, m.group(1), m.group(2)) for m in CITATION.finditer(text)]
    return found


def resolve(source: Path, cited: str) -> Path | None:
    for base in (REPO, source.parent):
        if (base / cited).is_file():
            return base / cited
    return None


def sections(doc: Path) -> set[str]:
    """The `§N` of every heading in `doc`."""
    return set(re.findall(r"^#+ §(\w+)\b", doc.read_text(encoding="utf-8"), re.MULTILINE))


def test_the_scan_finds_the_known_citations() -> None:
    cited = {(path.relative_to(REPO).as_posix(), doc) for path, doc, _ in citations()}
    assert ("operator/rlhf_operator/builders.py", "docs/CONTRACTS.md") in cited
    assert ("README.md", "docs/ARCHITECTURE.md") in cited


@pytest.mark.parametrize(
    ("source", "cited", "section"),
    citations(),
    ids=lambda v: v.relative_to(REPO).as_posix() if isinstance(v, Path) else str(v),
)
def test_cited_document_and_section_exist(source: Path, cited: str, section: str | None) -> None:
    doc = resolve(source, cited)
    where = source.relative_to(REPO)
    assert doc is not None, f"{where} cites {cited}, which is not in the repository"
    if section is not None:
        assert section in sections(doc), f"{where} cites {cited} §{section}: no such section"
