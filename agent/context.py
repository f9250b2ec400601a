"""What every handler gets as its first argument.

``Context`` is built once by the daemon and passed to each handler: the
platform object (the single mock point for the OS), the parsed
configuration, the state directory, the frozen state, and a place where a
command family keeps its own runtime state (open file handles, exec'd
processes), keyed by the family's name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent.platform import Platform


@dataclass
class Context:
    platform: Platform
    #: the parsed configuration (agent.config.Config); None in unit tests that need none
    config: Any = None
    #: absolute path of the state directory (-t); file handles and the frozen flag persist here
    statedir: str = "/var/run"
    #: True while filesystems are frozen: set and cleared by the fsfreeze commands
    frozen: bool = False
    #: per-family runtime state, e.g. services["file"] = the handle table
    services: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("qga"))

    def service(self, name: str, factory: Any) -> Any:
        """The runtime state of family ``name``, created by ``factory(self)`` on first use."""
        if name not in self.services:
            self.services[name] = factory(self)
        return self.services[name]
