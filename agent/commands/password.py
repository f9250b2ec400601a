"""guest-set-user-password: set an account's password with chpasswd(8).

The password arrives base64-encoded, raw or already crypted (``-e``); it is
handed to ``chpasswd`` on stdin as ``USER:PASSWORD``, so neither may break
that line.
"""

from __future__ import annotations

from agent.commands.glibcompat import b64decode, c_string, os_bytes
from agent.errors import AgentError
from agent.registry import command


@command("guest-set-user-password")
def set_user_password(ctx, username: str, password: str, crypted: bool) -> dict:
    raw = c_string(b64decode(password))
    if b"\n" in raw:
        raise AgentError("forbidden characters in raw password")
    user = os_bytes(username)
    if b"\n" in user or b":" in user:
        raise AgentError("forbidden characters in username")
    chpasswd = ctx.platform.find_program("chpasswd")
    if chpasswd is None:
        raise AgentError("cannot find 'passwd' program in PATH")
    argv = [chpasswd, "-e"] if crypted else [chpasswd]
    status = ctx.platform.run_helper(argv, input=user + b":" + raw + b"\n")
    if status < 0:
        raise AgentError("child process has terminated abnormally")
    if status:
        raise AgentError("child process has failed to set user password")
    return {}
