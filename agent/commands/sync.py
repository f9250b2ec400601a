"""guest-sync, guest-sync-delimited, guest-ping and guest-info.

These four always run, frozen or not: they are how a host finds out
whether the agent is alive and resynchronises the stream.
"""

from __future__ import annotations

from typing import Any

from agent.context import Context
from agent.registry import command

#: QEMU_VERSION of the qemu-ga this agent stands in for
QEMU_VERSION = "7.2.22"


@command("guest-sync-delimited", while_frozen=True)
def guest_sync_delimited(ctx: Context, id: int) -> int:
    # the response is preceded by a 0xFF byte, so the host can skip stale output
    ctx.delimit_response = True
    return id


@command("guest-sync", while_frozen=True)
def guest_sync(ctx: Context, id: int) -> int:
    return id


@command("guest-ping", while_frozen=True)
def guest_ping(ctx: Context) -> None:
    return None


@command("guest-info", while_frozen=True)
def guest_info(ctx: Context) -> dict[str, Any]:
    dispatcher = ctx.services.get("dispatcher")
    table = dispatcher.info() if dispatcher is not None else []
    return {"version": QEMU_VERSION, "supported_commands": table}
