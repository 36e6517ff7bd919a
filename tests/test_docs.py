"""The README's recipe reference names every field of the schema, and every recipe it names exists."""

import re
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from harness.recipe import Recipe

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def schema_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    fields = set()
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = [a for a in _flat_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            for sub in nested:
                fields |= schema_fields(sub, f"{dotted}.")
        else:
            fields.add(dotted)
    return fields


def _flat_args(annotation) -> list:
    args = get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for a in args for leaf in _flat_args(a)]


def test_readme_documents_every_recipe_field():
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-zA-Z_0-9]+)*)`", README))
    missing = sorted(f for f in schema_fields(Recipe) if f not in documented)
    assert not missing, f"fields missing from README's recipe reference: {missing}"


def test_recipes_named_in_readme_exist():
    named = set(re.findall(r"recipes/[\w/.-]+\.yaml", README))
    assert named, "README names no recipe"
    assert not [n for n in named if not (ROOT / n).is_file()]


def test_reliability_doc_names_only_tests_that_exist():
    """docs/reliability.md proves each guarantee with a named test: each name must be a test in tests/."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", doc))  # not the file names
    defined = set(re.findall(r"^def (test_[a-z0-9_]+)", "\n".join(
        p.read_text() for p in (ROOT / "tests").glob("test_*.py")), re.M))
    assert len(named) >= 20 and not named - defined, f"not tests: {sorted(named - defined)}"
    assert "[docs/reliability.md](docs/reliability.md)" in README
