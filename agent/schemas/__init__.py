"""The qemu-ga 7.2 command catalogue as JSON Schemas (package data).

``qga-commands.json`` is generated from QEMU's QAPI schema by
:mod:`agent.schemas.generate`; a test keeps the two in step.  Its command
order is qemu-ga's registration order, which ``-b help`` and ``guest-info``
reproduce.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

CATALOGUE = "qga-commands.json"


@lru_cache(maxsize=1)
def catalogue() -> dict[str, Any]:
    # a plain open beside this file: importlib.resources would cost the
    # resident agent about 1 MiB of modules (tempfile, shutil, zipfile...)
    with open(os.path.join(os.path.dirname(__file__), CATALOGUE), encoding="utf-8") as f:
        return json.load(f)


def commands() -> dict[str, dict[str, Any]]:
    """Command name -> {"arguments", "returns", "success-response"}, in schema order."""
    return catalogue()["commands"]


def command_order() -> list[str]:
    return list(commands())
