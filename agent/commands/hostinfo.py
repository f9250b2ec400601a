"""guest-get-host-name and guest-get-timezone."""

from __future__ import annotations

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command


@command("guest-get-host-name")
def get_host_name(ctx) -> dict:
    try:
        name = ctx.platform.hostname()
    except OSError as err:
        raise AgentError(f"cannot get hostname: {strerror(err)}") from None
    return {"host-name": name or "localhost"}


@command("guest-get-timezone")
def get_timezone(ctx) -> dict:
    """The local zone's abbreviation now (``CET``, ``UTC``) and its offset east of UTC."""
    zone, offset = ctx.platform.local_timezone()
    info: dict = {"offset": offset}
    if zone:
        info["zone"] = zone
    return info
