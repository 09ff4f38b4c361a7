"""Reading the tables of our own docs, so that tests can hold them against the code."""

from __future__ import annotations


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading``, without header and rule."""
    assert heading in text, f"the docs lost their {heading!r} section"
    rows = []
    for line in text.split(heading, 1)[1].splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(cells[0]) <= {"-", " "}:
            rows.append(cells)
    return rows[1:]
