"""docs/security.md says exactly what the tests show: its corpus table, its figures and its messages."""

from __future__ import annotations

import re
from pathlib import Path

from tests.audit_tamper import CORPUS, caught

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "security.md").read_text()


def between(marker: str) -> list[list[str]]:
    """The rows of the markdown table between <!-- marker --> and <!-- /marker -->."""
    block = PAGE.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    rows = [line for line in block.strip().splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_the_corpus_table_is_the_tested_corpus() -> None:
    def verdict(found: bool) -> str:
        return "caught" if found else "not detectable"

    expected = [[name, verdict(case.alone is not None), verdict(case.alone is not None or case.anchored not in
                                                                (None, "="))]
                for name, case in CORPUS.items()]
    assert between("corpus") == expected


def test_the_figures_are_the_corpus_figures() -> None:
    alone, anchored, total = caught(CORPUS)
    assert (f"**Figures: {total} cases; {alone} caught by `verify --key` alone, {anchored} with an anchor, on both "
            "backends.**") in " ".join(PAGE.split())


def _tested_text() -> str:
    """Every test's source, with Python's implicit string concatenation undone, so messages read whole."""
    sources = "".join(p.read_text() for p in sorted((REPO / "tests").rglob("*.py")))
    return re.sub(r'"\s*\n\s*(?:f|rf|fr)?"', "", sources)


def test_every_message_on_the_page_is_asserted_by_a_test() -> None:
    tested = _tested_text()
    for _, message in between("messages"):
        template = message.split("`")[1]
        for fragment in re.split(r"<n>|<time>|<key>", template):
            words = fragment.strip().removeprefix(":").strip()  # "event <n>: …" is built as f"event {n}: {…}"
            assert words in tested, f"untested: {fragment!r} of {template!r}"
