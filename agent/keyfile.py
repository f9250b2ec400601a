"""GLib's key-file format ("Desktop Entry" syntax), as qemu-ga reads and writes it.

Only what qemu-ga uses, with GLib 2.74's rules and error texts:

* ``[group]`` lines, ``key=value`` lines, ``#`` comments, blank lines; a key
  before the first group, a bad key or group name, or any other line is an
  error.  Whitespace before ``=`` is dropped, whitespace after it too, but a
  value keeps its trailing whitespace.  CRLF line ends are accepted.  A key
  given twice keeps its last value.
* string values decode ``\\s \\n \\t \\r \\\\`` and must be UTF-8; booleans
  are exactly ``true``, ``false``, ``1`` or ``0`` (trailing blanks allowed).
* writing escapes what GLib escapes: leading blanks (``\\s``, ``\\t``),
  newlines, carriage returns and backslashes.

Errors raise :class:`KeyFileError` carrying GLib's message.
"""

from __future__ import annotations


class KeyFileError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _lossy(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class KeyFile:
    """Raw values by group and key, as read from a file."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, bytes]] = {}

    # ------------------------------------------------------------ reading

    @classmethod
    def parse(cls, data: bytes) -> "KeyFile":
        keyfile = cls()
        group: str | None = None
        for line in data.split(b"\n"):
            if line.endswith(b"\r"):
                line = line[:-1]
            group = keyfile._parse_line(line, group)
        return keyfile

    def _parse_line(self, line: bytes, group: str | None) -> str | None:
        start = line.lstrip(b" \t\n\v\f\r")
        if not start or start.startswith(b"#"):
            return group
        if _is_group_line(start):
            name = start[1:start.rindex(b"]")]
            if not _is_group_name(name):
                raise KeyFileError(f"Invalid group name: {_lossy(name)}")
            text = _lossy(name)
            self.groups.setdefault(text, {})
            return text
        eq = start.find(b"=")
        if eq > 0:
            self._parse_pair(start, eq, group)
            return group
        raise KeyFileError(f"Key file contains line \u201c{_lossy(line)}\u201d which is not a "
                           "key-value pair, group, or comment")

    def _parse_pair(self, line: bytes, eq: int, group: str | None) -> None:
        if group is None:
            raise KeyFileError("Key file does not start with a group")
        key = line[:eq].rstrip(b" \t\n\v\f\r")
        if not _is_key_name(key):
            raise KeyFileError(f"Invalid key name: {_lossy(key)}")
        value = line[eq + 1:].lstrip(b" \t\n\v\f\r")
        if group == self._first_group() and key == b"Encoding" and value.lower() != b"utf-8":
            raise KeyFileError(f"Key file contains unsupported encoding \u201c{_lossy(value)}\u201d")
        if b"[" in key:
            return  # a translation (key[locale]); qemu-ga never asks for those
        values = self.groups[group]
        text = _lossy(key)
        values.pop(text, None)
        values[text] = value

    def _first_group(self) -> str | None:
        return next(iter(self.groups), None)

    def has_key(self, group: str, key: str) -> bool:
        return key in self.groups.get(group, {})

    def get_string(self, group: str, key: str) -> str:
        raw = self.groups[group][key]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyFileError(f"Key file contains key \u201c{key}\u201d with value "
                               f"\u201c{_lossy(raw)}\u201d which is not UTF-8") from None
        decoded = _unescape(raw)
        if decoded is None:
            raise KeyFileError(f"Key file contains key \u201c{key}\u201d which has a value "
                               "that cannot be interpreted.")
        return decoded

    def get_boolean(self, group: str, key: str) -> bool:
        word = self.groups[group][key].rstrip(b" \t\n\v\f\r")
        if word in (b"true", b"1"):
            return True
        if word in (b"false", b"0"):
            return False
        raise KeyFileError(f"Key file contains key \u201c{key}\u201d which has a value "
                           "that cannot be interpreted.")


def _is_group_line(line: bytes) -> bool:
    if not line.startswith(b"["):
        return False
    close = line.find(b"]")
    return close > 0 and not line[close + 1:].strip(b" \t")


def _is_group_name(name: bytes) -> bool:
    return bool(name) and not any(c in b"[]" or c < 0x20 or c == 0x7F for c in name)


def _is_key_name(key: bytes) -> bool:
    base = key.split(b"[", 1)[0]
    if not base or b"]" in base or base[:1] == b" " or base[-1:] == b" ":
        return False
    if b"[" not in key:
        return True
    locale = key[len(base) + 1:]
    if not locale.endswith(b"]"):
        return False
    return all(chr(c).isalnum() or c in b"-_.@" or c >= 0x80 for c in locale[:-1])


_ESCAPES = {ord("s"): " ", ord("n"): "\n", ord("t"): "\t", ord("r"): "\r", ord("\\"): "\\"}


def _unescape(raw: bytes) -> str | None:
    text = raw.decode("utf-8")
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(text):
            return None
        repl = _ESCAPES.get(ord(text[i + 1]))
        if repl is None:
            return None
        out.append(repl)
        i += 2
    return "".join(out)


# ------------------------------------------------------------ writing

def escape_value(value: str) -> str:
    """A string as g_key_file_set_string stores it."""
    out = []
    leading = True
    for ch in value:
        if ch == " ":
            out.append("\\s" if leading else " ")
        elif ch == "\t":
            out.append("\\t" if leading else "\t")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\\":
            out.append("\\\\")
            leading = False
        else:
            out.append(ch)
            leading = False
    return "".join(out)


def render(group: str, entries: list[tuple[str, str | bool]]) -> str:
    """One group as g_key_file_to_data writes it."""
    lines = [f"[{group}]"]
    for key, value in entries:
        if isinstance(value, bool):
            lines.append(f"{key}={'true' if value else 'false'}")
        else:
            lines.append(f"{key}={escape_value(value)}")
    return "\n".join(lines) + "\n"
