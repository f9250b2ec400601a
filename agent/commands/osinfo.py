"""guest-get-osinfo: the kernel (uname) and the distribution (os-release).

os-release is read from $QGA_OS_RELEASE when set, else /etc/os-release,
falling back to /usr/lib/os-release when that cannot be read or parsed. It
is parsed as qemu-ga does: as a GLib key file (so a line that is no
``KEY=VALUE`` makes the whole file unusable), a double-quoted value loses
its quotes and the shell escapes ``\\$ \\' \\" \\\\ \\```, any other value is cut
at its first space or ``;`` (single quotes stay).
"""

from __future__ import annotations

from agent.registry import command

OS_RELEASE_FIELDS = (("id", "ID"), ("name", "NAME"), ("pretty-name", "PRETTY_NAME"),
                     ("version", "VERSION"), ("version-id", "VERSION_ID"),
                     ("variant", "VARIANT"), ("variant-id", "VARIANT_ID"))


@command("guest-get-osinfo")
def get_osinfo(ctx) -> dict:
    platform = ctx.platform
    uts = platform.uname()
    info = {"kernel-release": uts.release, "kernel-version": uts.version,
            "machine": uts.machine}
    override = platform.getenv("QGA_OS_RELEASE")
    if override is not None:
        keys = _load(ctx, override)
    else:
        keys = _load(ctx, "/etc/os-release")
        if keys is None:
            keys = _load(ctx, "/usr/lib/os-release")
    for field, key in OS_RELEASE_FIELDS:
        if keys is not None and key in keys:
            info[field] = unquote(keys[key])
    return info


def _load(ctx, path: str) -> dict[str, str] | None:
    try:
        raw = ctx.platform.read_bytes(path)
    except OSError as err:
        ctx.log.info("failed to read '%s', error: %s", path, err.strerror)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        ctx.log.info("file is not utf-8 encoded: %s", path)
        return None
    keys = parse_keyfile_group(text)
    if keys is None:
        ctx.log.info("failed to parse file '%s'", path)
    return keys


def parse_keyfile_group(text: str) -> dict[str, str] | None:
    """The raw values of the file's first (implicit) group, as GLib's key file
    parser reads them; None when a line is neither blank, comment, group nor
    a valid ``KEY=VALUE`` (GLib rejects the whole file then)."""
    keys: dict[str, str] = {}
    group = "os-release"  # the group line qemu-ga puts in front of the file
    for line in text.split("\n"):
        line = line.lstrip(" \t\n\r\f\v")
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.rstrip("\r").endswith("]"):
                return None
            group = line.rstrip("\r")[1:-1]
            continue
        key, sep, value = line.partition("=")
        key = key.rstrip(" \t\n\r\f\v")
        if not sep or not _valid_key(key):
            return None
        if group == "os-release":
            keys[key] = value.lstrip(" \t\n\r\f\v")
    return keys


def _valid_key(key: str) -> bool:
    if not key or key[0] == " " or key[-1] == " ":
        return False
    bracket = key.find("[")
    if bracket < 0:
        return "]" not in key
    # a localised key, KEY[locale]
    return key.endswith("]") and bracket > 0 and "[" not in key[bracket + 1:-1] \
        and "]" not in key[bracket + 1:-1] and key[bracket - 1] != " "


_UNESCAPED = set("$'\"\\`")


def unquote(value: str) -> str:
    """qemu-ga's os-release value rule, byte for byte (including its quirk of
    keeping the last character twice when the closing quote is missing)."""
    if not value.startswith('"'):
        for stop in (" ", ";"):
            cut = value.find(stop)
            if cut >= 0:
                value = value[:cut]
        return value
    chars = list(value)
    out = 0
    pos = 1
    while pos < len(chars):
        if chars[pos] == "\\" and pos + 1 < len(chars) and chars[pos + 1] in _UNESCAPED:
            pos += 1
        elif chars[pos] == '"':
            return "".join(chars[:out])
        chars[out] = chars[pos]
        out += 1
        pos += 1
    return "".join(chars)
