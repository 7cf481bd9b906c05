"""The README's attack and defense tables are what the registries generate (fipurify.catalog)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fipurify import catalog
from fipurify.attacks import ATTACKS
from fipurify.defenses import DEFENSES, Defense

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_are_generated_from_the_registries():
    text = README.read_text(encoding="utf-8")
    assert set(catalog.blocks_in(text)) == set(catalog.BLOCKS), "a catalog marker is missing from README.md"
    assert catalog.render(text) == text, "README tables are stale: run python -m fipurify.catalog README.md"


def test_every_registered_name_is_in_a_table():
    tables = catalog.attacks_table() + catalog.fip_table() + catalog.baselines_table()
    for name in [*ATTACKS, *ATTACKS.aliases, *DEFENSES]:
        assert f"`{name}`" in tables


class _Dummy(Defense):
    """Dummy purification: a one-line summary for the table.

    Not this paragraph."""

    tasks = ("translation",)


def test_a_new_defense_appears_in_the_generated_table(monkeypatch):
    monkeypatch.setattr(DEFENSES, "_entries", dict(DEFENSES._entries))  # registered for this test only
    monkeypatch.setattr(DEFENSES, "table", dict(DEFENSES.table))
    DEFENSES.register("dummy-defense", _Dummy)
    row = next(line for line in catalog.baselines_table().splitlines() if "`dummy-defense`" in line)
    assert "Dummy purification: a one-line summary for the table; *translation* only" in row
    assert "Not this paragraph" not in row
    text = README.read_text(encoding="utf-8")
    assert catalog.render(text) != text  # so the README test fails until the tables are regenerated


def test_summaries_tuples_and_grouping():
    fip = catalog.fip_table().splitlines()
    assert not any("(default)" in line for line in fip)  # the default purifier is no longer f-FIP
    assert "| `detect-unlearn-clip-all` (default) |" in catalog.baselines_table()
    assert any(line.startswith("| `ffip-no-trf`, `ffip-no-lr` | as `ffip` |") for line in fip)
    attacks = catalog.attacks_table()
    assert "`trojan` (`troj-one`, `troj-all`)" in attacks
    assert "*translation*" in attacks  # trigger-words names its task


def test_render_touches_only_marked_blocks(tmp_path):
    doc = ("intro\n<!-- catalog:attacks -->\nold table\n<!-- /catalog:attacks -->\nafter\n"
           "<!-- catalog:unknown -->\nkept\n<!-- /catalog:unknown -->\n")
    path = tmp_path / "doc.md"
    path.write_text(doc, encoding="utf-8")
    assert catalog.update(path) is True
    new = path.read_text(encoding="utf-8")
    assert new.startswith("intro\n<!-- catalog:attacks -->\n| name | trigger |")
    assert new.endswith("<!-- /catalog:attacks -->\nafter\n<!-- catalog:unknown -->\nkept\n<!-- /catalog:unknown -->\n")
    assert catalog.update(path) is False
    assert catalog.main([str(path), "--check"]) == 0
    path.write_text(doc, encoding="utf-8")
    assert catalog.main([str(path), "--check"]) == 1
    assert path.read_text(encoding="utf-8") == doc


@pytest.mark.parametrize("obj, name, expected", [
    (type("A", (), {"summary": "one"}), "x", "one"),
    (type("B", (), {"summary": {"x": "two", "y": "three"}}), "y", "three"),
    (type("C", (), {"__doc__": "First sentence. Second one.\n\nMore."}), "x", "First sentence"),
])
def test_summary_sources(obj, name, expected):
    assert catalog.summary(obj, name) == expected


def test_cells_escape_pipes_and_pad_short_rows():
    out = catalog.table(("name", "what"), [("`a`", "x | y"), ("`b`", "z"), ("`c`", "w")], per_row=2)
    assert out.splitlines() == ["| name | what | name | what |", "|---|---|---|---|",
                                "| `a` | x \\| y | `b` | z |", "| `c` | w |  |  |"]
