"""The docs say what the code does: the README's exit codes are errors.py's, the unit file and
the README install the same way, the example config runs as a user, and the docs link only
to files inside the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from streambars import errors
from streambars.config import ConfigError
from streambars.sources.historical import UnknownSymbolError

from .markdown import table_after

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_exit_codes_are_the_code_s():
    rows = table_after(README, "## Troubleshooting")
    assert {int(r[0]): r[1] for r in rows} == errors.EXIT_MEANINGS
    examples = {int(r[0]): r[2] for r in rows}
    # Where the README files an error is where the code files it.
    for cls, words in [(errors.AuthenticationError, "refused API key"),
                       (errors.DatasetError, "a dataset Databento does not serve"),
                       (UnknownSymbolError, "an unknown symbol"), (ConfigError, "malformed TOML")]:
        assert words in examples[cls.exit_code], f"{cls.__name__} exits {cls.exit_code}"


def _install_lines(text: str) -> list[str]:
    return [re.sub(r"\s+#.*$", "", x.strip().lstrip("#").strip()) for x in text.splitlines()
            if x.strip().lstrip("#").strip().startswith("sudo ")]


def test_unit_file_installs_as_the_readme_says():
    unit = _install_lines((REPO / "config" / "streambars.service").read_text())
    readme = _install_lines(README)
    assert unit and all(line in readme for line in unit), set(unit) - set(readme)
    assert any("pip install ." in line for line in unit)  # from a checkout: not on PyPI
    # Nowhere (docs, config, messages) tells anyone to install streambars from PyPI.
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "config").iterdir(),
                 *(REPO / "streambars").rglob("*.py")]:
        if path.is_file():
            assert not re.search(r"pip install '?streambars", path.read_text()), path


def test_readme_backfill_example_config_writes_where_the_user_can():
    assert "streambars backfill --config config/streambars.toml" in README
    path = tomllib.loads((REPO / "config" / "streambars.toml").read_text())["store"]["path"]
    assert not Path(path).is_absolute(), path


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_refer_only_to_files_in_the_repository(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file = (doc.parent / target.split("#", 1)[0]).resolve()
        assert file.is_relative_to(REPO) and file.exists(), f"{doc.name} links to {target}"
    for name in re.findall(r"[\w./-]+\.md\b", text):
        if "://" in name:
            continue
        candidates = [doc.parent / name, REPO / name, REPO / "docs" / name]
        assert any(c.resolve().is_relative_to(REPO) and c.exists() for c in candidates), \
            f"{doc.name} refers to {name}, not in the repository"
