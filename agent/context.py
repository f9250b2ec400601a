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
from typing import Any, Callable

from agent.platform import Platform
from agent.timers import Scheduler


@dataclass
class Context:
    platform: Platform
    #: the parsed configuration (agent.config.Config); None in unit tests that need none
    config: Any = None
    #: absolute path of the state directory (-t); file handles and the frozen flag persist here
    statedir: str = "/var/run"
    #: True while filesystems are frozen; changed only through set_frozen() (fsfreeze)
    frozen: bool = False
    #: per-family runtime state, e.g. services["file"] = the handle table
    services: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("qga"))
    #: set by guest-sync-delimited: its response goes out after a 0xFF byte
    delimit_response: bool = False
    #: timers run by the daemon's loop (``ctx.timers.call_later(delay, fn)``)
    timers: Scheduler = field(default_factory=Scheduler)
    #: told of every change of the frozen state, as ``listener(frozen)``
    frozen_listeners: list[Callable[[bool], None]] = field(default_factory=list)

    def set_frozen(self, frozen: bool) -> None:
        """Enter or leave the frozen state; the dispatcher, logging and the
        state directory follow through their listeners."""
        if frozen == self.frozen:
            return
        self.frozen = frozen
        for listener in list(self.frozen_listeners):
            listener(frozen)

    def service(self, name: str, factory: Any) -> Any:
        """The runtime state of family ``name``, created by ``factory(self)`` on first use."""
        if name not in self.services:
            self.services[name] = factory(self)
        return self.services[name]
