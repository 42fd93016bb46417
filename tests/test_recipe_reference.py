"""docs/guide/recipe-reference.md is generated from the recipe schema: a field added, removed or re-commented in
`mmbridge/config.py` without regenerating the page fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmbridge import config
from mmbridge.recipe_reference import SECTIONS, render

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "recipe-reference.md"


def test_the_page_is_the_schema_as_generated():
    assert PAGE.read_text() == render(), (
        "docs/guide/recipe-reference.md is stale: python -m mmbridge.recipe_reference > docs/guide/recipe-reference.md"
    )


def test_every_section_and_field_of_the_schema_is_listed():
    page = render()
    nested = {f.type for _, cls in SECTIONS for f in dataclasses.fields(cls)} & {c.__name__ for _, c in SECTIONS}
    assert nested <= {"ModelConfig", "LoraConfig", "MoeConfig", "MmaConfig"}  # each has its own section
    for where, cls in SECTIONS:
        assert f"## `{where}`" in page
        assert all(f"| `{f.name}` |" in page for f in dataclasses.fields(cls))
    assert "| `max_length` | int | `512` |" in page and "| `bad_samples` | str | `'error'` | error \\| skip |" in page
    assert config.DataSource in [c for _, c in SECTIONS] and config.EvalTask in [c for _, c in SECTIONS]
