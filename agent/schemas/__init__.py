"""The qemu-ga 7.2 command catalogue as JSON Schemas (package data).

``qga-commands.json`` is generated from QEMU's QAPI schema by
:mod:`agent.schemas.generate`; a test keeps the two in step.  Its command
order is qemu-ga's registration order, which ``-b help`` and ``guest-info``
reproduce.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

CATALOGUE = "qga-commands.json"


@lru_cache(maxsize=1)
def catalogue() -> dict[str, Any]:
    text = resources.files(__name__).joinpath(CATALOGUE).read_text(encoding="utf-8")
    return json.loads(text)


def commands() -> dict[str, dict[str, Any]]:
    """Command name -> {"arguments", "returns", "success-response"}, in schema order."""
    return catalogue()["commands"]


def command_order() -> list[str]:
    return list(commands())
