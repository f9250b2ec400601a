"""guest-get-devices: Windows only in qemu-ga 7.2.

Registered so that guest-info lists it and a call answers as qemu-ga does
on Linux, "Command guest-get-devices has been disabled"; the dispatcher
knows it is disabled from the registration.
"""

from __future__ import annotations

from agent.errors import AgentError
from agent.registry import command

UNSUPPORTED = "this feature or command is not currently supported"


@command("guest-get-devices")
def get_devices(ctx) -> list[dict]:
    # Only reached if the dispatcher did not disable it; qemu-ga's Linux
    # implementation gives this answer too.
    raise AgentError(UNSUPPORTED)
