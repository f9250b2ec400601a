"""qemu-ga's wire protocol as a pure object: bytes in, requests out.

    proto = Protocol()
    for event in proto.feed(data):          # any chunking of the stream
        if isinstance(event, Request): ...  # event.value: the parsed JSON value
        else: ...                           # ParseError: event.desc, qemu-ga's text
    proto.encode(payload, delimited=True)   # b'\\xff{"return": 1}\\n'

No I/O happens here; the daemon moves the bytes.  Framing, limits and
error texts are qemu-ga 7.2's (see :mod:`agent.jsonstream`); one thing is
better: :meth:`Protocol.reset` is called when a client goes away, so a
half-sent request cannot swallow the next client's requests (qemu-ga keeps
the stale state until a 0xFF or another lexical error arrives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.jsonparse import JSONParseError, fast_parse, parse_tokens
from agent.jsonstream import Message, MessageStream
from agent.jsonwrite import encode_chunks, encode_line

#: the byte that resynchronises: never valid in qemu-ga's JSON
SENTINEL = b"\xff"


@dataclass(frozen=True)
class Request:
    """A complete JSON value from the host (not yet checked to be a command)."""
    value: Any


@dataclass(frozen=True)
class ParseError:
    """Input that could not be read as JSON; answered without an ``id``."""
    desc: str


Event = Request | ParseError


class Protocol:
    def __init__(self) -> None:
        self._stream = MessageStream()

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        # plain requests between messages take the fast path; the rest (and
        # anything after the first request it cannot take) the exact reader
        while pos < len(data) and self._stream.at_start:
            fast = fast_parse(data, pos)
            if fast is None:
                break
            events.append(Request(fast[0]))
            pos = fast[1]
        if pos:
            data = data[pos:]
            if not data:
                return events
        for item in self._stream.feed(data):
            if isinstance(item, Message):
                try:
                    events.append(Request(parse_tokens(item.tokens)))
                except JSONParseError as exc:
                    events.append(ParseError(exc.desc))
            else:
                events.append(ParseError(item.desc))
        return events

    def reset(self) -> None:
        """Drop any partial input: the client went away."""
        self._stream.reset()

    @property
    def idle(self) -> bool:
        return self._stream.idle

    @property
    def pending_bytes(self) -> int:
        return self._stream.pending_bytes

    @staticmethod
    def encode(payload: dict[str, Any], delimited: bool = False) -> bytes:
        return encode_line(payload, delimited)

    @staticmethod
    def encode_chunks(payload: dict[str, Any], delimited: bool = False) -> list[bytes]:
        """The same line as chunks to write in turn (large strings stay uncopied)."""
        return encode_chunks(payload, delimited)
