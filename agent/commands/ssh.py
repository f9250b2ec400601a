"""guest-ssh-get/add/remove-authorized-keys: a user's ~/.ssh/authorized_keys.

Keys are whole lines. Adding keeps the file's lines as they are and appends
the keys not yet present; removing drops the lines equal to a given key and
keeps everything else (comments too). The file is rewritten atomically,
owned by the user, mode 0600; ``~/.ssh`` is created (0700) when missing.
Keys are checked before anything else is looked at: none may start with
``#`` or contain a newline.
"""

from __future__ import annotations

import errno
import os
import stat

from agent.commands.glibcompat import file_get_contents_error, os_bytes, os_path, strerror
from agent.errors import AgentError
from agent.platform import ReplaceError
from agent.registry import command


def _check_keys(keys: list[str]) -> None:
    for key in keys:
        if key.startswith("#") or "\n" in key:
            raise AgentError(f"invalid OpenSSH public key: '{key}'")


def _user(ctx, username: str):
    entry = ctx.platform.getpwnam(os_path(username))
    if entry is None:
        # glibc leaves errno at 0 for "no such user": qemu-ga prints "Success"
        raise AgentError(f"failed to lookup user '{username}': Success")
    return entry


def _paths(entry) -> tuple[str, str]:
    ssh_dir = os.path.join(entry.home, ".ssh")
    return ssh_dir, os.path.join(ssh_dir, "authorized_keys")


def _read_lines(platform, path: str) -> list[bytes]:
    """The file split on newlines, as g_strsplit does (a final newline gives a
    last empty line). Raises AgentError with GLib's reason."""
    try:
        st = platform.stat(path)
    except OSError as err:
        raise _read_error(path, err, "open") from None
    try:
        data = platform.read_bytes(path)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP):
            stage = "open"
        else:
            stage = "read" if stat.S_ISREG(st.st_mode) else "stream"
        raise _read_error(path, err, stage) from None
    if not data:
        return []  # g_strsplit("") is an empty list, not one empty line
    return data.split(b"\n")


def _read_error(path: str, err: OSError, stage: str) -> AgentError:
    return AgentError(f"failed to read '{path}': {file_get_contents_error(path, err, stage)}")


def _write_lines(platform, path: str, lines: list[bytes], entry) -> None:
    data = b"\n".join(lines)
    try:
        platform.replace_file(path, data)
    except ReplaceError as err:
        raise AgentError(f"failed to write to '{path}': {_glib_set_contents_error(path, err)}") \
            from None
    try:
        platform.chown(path, entry.uid, entry.gid)
    except OSError as err:
        raise AgentError(f"failed to set ownership of '{path}': {strerror(err)}") from None
    try:
        platform.chmod(path, 0o600)
    except OSError as err:
        raise AgentError(f"failed to set permissions of '{path}': {strerror(err)}") from None


def _glib_set_contents_error(path: str, err: ReplaceError) -> str:
    """GLib's g_file_set_contents wording for the step that failed."""
    reason = strerror(err)
    if err.step == "create":
        return f"Failed to create file \u201c{err.tmp}\u201d: {reason}"
    if err.step == "write":
        return f"Failed to write file \u201c{err.tmp}\u201d: write() failed: {reason}"
    return (f"Failed to rename file \u201c{err.tmp}\u201d to \u201c{path}\u201d: "
            f"g_rename() failed: {reason}")


def _make_ssh_dir(platform, path: str, entry) -> None:
    try:
        platform.mkdir(path, 0o700)
    except OSError as err:
        raise AgentError(f"failed to create directory '{path}': {strerror(err)}") from None
    try:
        platform.chown(path, entry.uid, entry.gid)
    except OSError as err:
        raise AgentError(f"failed to set ownership of directory '{path}': "
                         f"{strerror(err)}") from None
    try:
        platform.chmod(path, 0o700)
    except OSError as err:
        raise AgentError(f"failed to set permissions of directory '{path}': "
                         f"{strerror(err)}") from None


@command("guest-ssh-get-authorized-keys")
def get_authorized_keys(ctx, username: str) -> dict:
    entry = _user(ctx, username)
    _ssh_dir, path = _paths(entry)
    keys = []
    for line in _read_lines(ctx.platform, path):
        line = line.strip()  # g_strstrip: ASCII white space
        if line and not line.startswith(b"#"):
            keys.insert(0, os.fsdecode(line))
    return {"keys": keys}


@command("guest-ssh-add-authorized-keys")
def add_authorized_keys(ctx, username: str, keys: list[str], reset: bool = False) -> dict:
    _check_keys(keys)
    entry = _user(ctx, username)
    ssh_dir, path = _paths(entry)
    lines = None
    if not reset:
        try:
            lines = _read_lines(ctx.platform, path)
        except AgentError:
            lines = None
    if lines is None:
        if not ctx.platform.is_dir(ssh_dir):
            _make_ssh_dir(ctx.platform, ssh_dir, entry)
        lines = []
    for key in map(os_bytes, keys):
        if key not in lines:
            lines.append(key)
    _write_lines(ctx.platform, path, lines, entry)
    return {}


@command("guest-ssh-remove-authorized-keys")
def remove_authorized_keys(ctx, username: str, keys: list[str]) -> dict:
    _check_keys(keys)
    entry = _user(ctx, username)
    _ssh_dir, path = _paths(entry)
    if not ctx.platform.exists(path):
        return {}
    unwanted = set(map(os_bytes, keys))
    lines = _read_lines(ctx.platform, path)
    _write_lines(ctx.platform, path, [line for line in lines if line not in unwanted], entry)
    return {}
