"""The command registry: wire names mapped to handlers by explicit registration.

A handler module does::

    from agent.registry import command

    @command("guest-get-host-name")
    def get_host_name(ctx):
        return {"host-name": ctx.platform.hostname()}

Handlers take the dispatch context first and the request's arguments as
keyword arguments, with the wire name's ``-`` turned into ``_``
(``"input-data"`` arrives as ``input_data``). They return the value put
under ``"return"`` and raise :class:`agent.errors.AgentError` for errors;
they never build wire dicts themselves.

``while_frozen`` marks the commands qemu-ga still runs while filesystems are
frozen; ``success_response=False`` marks commands that send no reply on
success (guest-shutdown, guest-suspend-*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    while_frozen: bool = False
    success_response: bool = True


COMMANDS: dict[str, Command] = {}


def command(name: str, *, while_frozen: bool = False,
            success_response: bool = True) -> Callable[[Handler], Handler]:
    """Register ``handler`` under the wire name ``name``."""

    def register(handler: Handler) -> Handler:
        if name in COMMANDS:
            raise RuntimeError(f"command {name} registered twice")
        COMMANDS[name] = Command(name, handler, while_frozen, success_response)
        return handler

    return register
