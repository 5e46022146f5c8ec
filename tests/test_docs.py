"""Every `docs/cca.md §N` that the code and the documents cite names a section of
docs/cca.md, and nothing cites the specification that lived outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"docs/cca\.md §(\d+)(?:-(\d+))?(?: and §(\d+))?")


def _sources():
    for folder in ("cca_jax", "cca_kernels", "convert", "train", "benchmarks", "tests"):
        yield from (REPO / folder).rglob("*.py")
    yield from REPO.glob("*.md")
    yield from (REPO / "tests" / "golden").glob("*.md")


def test_every_cited_section_exists():
    sections = set(re.findall(r"^## §(\d+) ", (REPO / "docs" / "cca.md").read_text(), re.M))
    assert sections >= {"0", "1", "2", "3", "4", "5", "6"}, sections
    cited = {}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        assert "SPEC" + ".md" not in text and "SPEC" + " section" not in text, path
        for match in CITED.finditer(text):
            first, last, other = match.groups()
            numbers = set(range(int(first), int(last or first) + 1)) | (
                {int(other)} if other else set())
            for number in numbers:
                cited.setdefault(str(number), []).append(path.relative_to(REPO))
    assert cited, "no code cites docs/cca.md"
    missing = {n: paths for n, paths in cited.items() if n not in sections}
    assert not missing, missing
