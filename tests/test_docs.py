"""The documentation matches the code: every CLI's --help as docs/cli/ holds it, and the README's front door."""

import re
from pathlib import Path

import pytest
from support.cli_help import DOCS, TOOLS, documents, versions

ROOT = Path(__file__).resolve().parent.parent


def test_cli_help_is_documented_as_printed():
    recorded = {name: (DOCS / f"{name}.txt") for name in TOOLS}
    missing = [str(p) for p in recorded.values() if not p.is_file()]
    assert not missing, f"{missing} missing: run `python tests/support/cli_help.py --write`"
    header = recorded["train"].read_text().splitlines()[1]
    if header != versions():
        pytest.skip(f"docs/cli was generated with other versions: {header}")
    now = documents()
    stale = [name for name, p in recorded.items() if p.read_text() != now[name]]
    assert not stale, f"docs/cli/{{{','.join(stale)}}}.txt are stale: run `python tests/support/cli_help.py --write`"


def test_readme_is_a_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for doc in sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "studies").glob("*/README.md")):
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), (
                    f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
                )
