"""The shipped JSON Schemas match what the generator derives from the QAPI schema."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from agent import schemas
from agent.schemas import generate


def test_shipped_catalogue_matches_the_generator():
    if not generate.DEFAULT_SOURCE.exists():
        pytest.skip(f"QAPI schema not found at {generate.DEFAULT_SOURCE}")
    shipped = (generate.HERE / schemas.CATALOGUE).read_text(encoding="utf-8")
    assert shipped == generate.render(generate.DEFAULT_SOURCE), \
        "run: python -m agent.schemas.generate"


def test_catalogue_has_qemu_ga_7_2_commands_in_registration_order():
    order = schemas.command_order()
    assert len(order) == 42
    assert order[0] == "guest-sync-delimited" and order[-1] == "guest-get-cpustats"
    assert schemas.commands()["guest-shutdown"]["success-response"] is False


@pytest.mark.parametrize("name", schemas.command_order())
def test_every_schema_is_valid_json_schema(name):
    spec = schemas.commands()[name]
    Draft202012Validator.check_schema(spec["arguments"])
    Draft202012Validator.check_schema(spec["returns"])
