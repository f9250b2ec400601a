"""Cutting qemu-ga's input byte stream into JSON messages.

This is the tokenizer and the message framer of QEMU's JSON dialect, with
qemu-ga 7.2's exact behaviour, because hosts depend on it:

* tokens are JSON's plus single-quoted strings; anything else is a lexical
  error reported as ``JSON parse error, stray 'TOKEN'`` (the token text as
  far as it got, the offending byte included), after which input is skipped
  up to a structural character, an ASCII control character other than tab,
  or a byte 0xFE/0xFF.  That is why a host sends 0xFF to resynchronise.
* a message ends when its outermost ``{}``/``[]`` closes, or at once for a
  scalar or an unbalanced closer; no newline is needed.
* per message at most 64 MiB of token text, 2 Mi tokens and 1024 levels of
  nesting; beyond that the message is dropped with an error and framing
  starts again with the next token.

:class:`MessageStream` is sans-IO: ``feed(bytes)`` returns what completed,
as :class:`Message` (the tokens of one message, for
:func:`agent.jsonparse.parse_tokens`) or :class:`StreamError`.  The
per-character work is done on runs with regular expressions, so a 64 MiB
string costs a few regex scans, not 64 Mi Python steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.modutf8 import decode_lossy

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# token types
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = "{", "}", "[", "]", ":", ","
STRING, INTEGER, FLOAT, KEYWORD = "string", "integer", "float", "keyword"
# a token cut off by the lexer's size limit; never reaches the parser
OVERSIZE = "oversize"

# lexer states
_START = 0
_RECOVERY = 1
_DQ, _DQ_ESC, _SQ, _SQ_ESC = 2, 3, 4, 5
_ZERO, _SIGN, _DIGITS = 6, 7, 8
_MANTISSA, _MANTISSA_DIGITS = 9, 10
_EXP_E, _EXP_SIGN, _EXP_DIGITS = 11, 12, 13
_KEYWORD = 14

_STRUCTURAL = {ord("{"): LCURLY, ord("}"): RCURLY, ord("["): LSQUARE,
               ord("]"): RSQUARE, ord(":"): COLON, ord(","): COMMA}

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_DQ_RUN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]*")
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# recovery skips everything but controls (tab excepted), FE/FF and structurals
_RECOVERY_RUN = re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*")

_D0, _D9 = ord("0"), ord("9")


@dataclass(frozen=True)
class Token:
    kind: str
    text: bytes


@dataclass(frozen=True)
class Message:
    """The tokens of one complete JSON value, ready for the parser."""
    tokens: list[Token]


@dataclass(frozen=True)
class StreamError:
    """A lexical or framing error; ``desc`` is qemu-ga's text."""
    desc: str


class MessageStream:
    """qemu-ga's JSON lexer and message framer, fed bytes, giving messages."""

    def __init__(self) -> None:
        self._out: list[Message | StreamError] = []
        self.reset()

    def reset(self) -> None:
        """Forget any partial token or message (a new client, or a resync)."""
        self._state = _START
        self._token = bytearray()
        self._tokens: list[Token] = []
        self._braces = 0
        self._brackets = 0
        self._size = 0

    @property
    def at_start(self) -> bool:
        """Between messages: the next byte begins a new token of a new message."""
        return self._state == _START and not self._tokens

    @property
    def idle(self) -> bool:
        """True when no partial token or message is pending."""
        return self._state in (_START, _RECOVERY) and not self._tokens

    @property
    def pending_bytes(self) -> int:
        """Bytes held for the message being built (memory accounting)."""
        return len(self._token) + self._size

    # ------------------------------------------------------------- lexer

    def feed(self, data: bytes) -> list[Message | StreamError]:
        """Consume ``data``; return the messages and errors it completed."""
        pos = 0
        end = len(data)
        while pos < end:
            pos = self._step(data, pos, end)
        out, self._out = self._out, []
        return out

    def _step(self, data: bytes, pos: int, end: int) -> int:
        state = self._state
        if state == _START:
            pos = _WHITESPACE.match(data, pos).end()
            if pos >= end:
                return pos
            return self._start_token(data[pos], pos)
        if state == _RECOVERY:
            return _RECOVERY_RUN.match(data, pos).end() if data[pos] not in _RECOVERY_STOP \
                else self._leave_recovery(pos)
        if state in (_DQ, _SQ):
            return self._string(data, pos, end, state)
        if state in (_DQ_ESC, _SQ_ESC):
            byte = data[pos]
            if 0x20 <= byte <= 0xFD:
                self._append(bytes((byte,)), _DQ if state == _DQ_ESC else _SQ)
                return pos + 1
            return self._error(byte, pos)
        return self._number_or_keyword(data, pos, end, state)

    def _start_token(self, byte: int, pos: int) -> int:
        kind = _STRUCTURAL.get(byte)
        if kind is not None:
            self._token_done(kind, bytes((byte,)))
            return pos + 1
        if byte == 0x22:
            nxt = _DQ
        elif byte == 0x27:
            nxt = _SQ
        elif byte == _D0:
            nxt = _ZERO
        elif _D0 < byte <= _D9:
            nxt = _DIGITS
        elif byte == 0x2D:
            nxt = _SIGN
        elif 0x61 <= byte <= 0x7A:
            nxt = _KEYWORD
        else:
            return self._error(byte, pos)
        self._token = bytearray((byte,))
        self._state = nxt
        return pos + 1

    def _leave_recovery(self, pos: int) -> int:
        self._state = _START
        return pos

    def _take_run(self, data: bytes, pos: int, run: int) -> tuple[int, bool]:
        """Add ``data[pos:run]`` to the token; (new position, cut by the size limit)."""
        room = MAX_TOKEN_SIZE + 1 - len(self._token)
        if run - pos >= room:
            self._token += data[pos:pos + room]
            self._oversize()
            return pos + room, True
        self._token += data[pos:run]
        return run, False

    def _string(self, data: bytes, pos: int, end: int, state: int) -> int:
        run = (_DQ_RUN if state == _DQ else _SQ_RUN).match(data, pos).end()
        if run > pos:
            pos, cut = self._take_run(data, pos, run)
            if cut or pos >= end:
                return pos
        byte = data[pos]
        quote = 0x22 if state == _DQ else 0x27
        if byte == quote:
            self._token.append(byte)
            self._token_done(STRING, bytes(self._token))
            return pos + 1
        if byte == 0x5C:
            self._append(b"\\", _DQ_ESC if state == _DQ else _SQ_ESC)
            return pos + 1
        return self._error(byte, pos)

    def _number_or_keyword(self, data: bytes, pos: int, end: int, state: int) -> int:
        byte = data[pos]
        if state in (_DIGITS, _MANTISSA_DIGITS, _EXP_DIGITS, _KEYWORD):
            run = (_KEYWORD_RUN if state == _KEYWORD else _DIGIT_RUN).match(data, pos).end()
            if run > pos:
                return self._take_run(data, pos, run)[0]
        if state == _ZERO and _D0 <= byte <= _D9:
            return self._error(byte, pos)  # no leading zeros
        nxt = _TRANSITIONS[state].get(byte)
        if nxt is not None:
            self._append(bytes((byte,)), nxt)
            return pos + 1
        final = _FINAL.get(state)
        if final is not None:
            # the byte ends the token and is looked at again from the start
            self._token_done(final, bytes(self._token))
            return pos
        return self._error(byte, pos)

    def _append(self, piece: bytes, state: int) -> None:
        self._token += piece
        self._state = state
        if len(self._token) > MAX_TOKEN_SIZE:
            self._oversize()

    def _oversize(self) -> None:
        # qemu-ga hands the cut-off token to the framer, which reports the size limit
        self._state = _START
        token = Token(OVERSIZE, b"")
        self._token = bytearray()
        self._process(token, MAX_TOKEN_SIZE + 1)

    def _error(self, byte: int, pos: int) -> int:
        """A lexical error: report the token so far plus ``byte``, then recover."""
        self._token.append(byte)
        text = bytes(self._token)
        self._token = bytearray()
        self._state = _RECOVERY
        self._emit(StreamError(f"JSON parse error, stray '{decode_lossy(text)}'"))
        return pos + 1

    # ------------------------------------------------------------- framer

    def _token_done(self, kind: str, text: bytes) -> None:
        self._token = bytearray()
        self._state = _START
        self._process(Token(kind, text), len(text))

    def _process(self, token: Token, size: int) -> None:
        kind = token.kind
        if kind == LCURLY:
            self._braces += 1
        elif kind == RCURLY:
            self._braces -= 1
        elif kind == LSQUARE:
            self._brackets += 1
        elif kind == RSQUARE:
            self._brackets -= 1
        if self._size + size + 1 > MAX_TOKEN_SIZE:
            return self._emit(StreamError("JSON token size limit exceeded"))
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            return self._emit(StreamError("JSON token count limit exceeded"))
        if self._braces + self._brackets > MAX_NESTING:
            return self._emit(StreamError("JSON nesting depth limit exceeded"))
        self._tokens.append(token)
        self._size += size
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return None
        return self._emit(Message(self._tokens))

    def _emit(self, item: Message | StreamError) -> None:
        self._tokens = []
        self._braces = self._brackets = 0
        self._size = 0
        self._out.append(item)


_RECOVERY_STOP = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0xFE, 0xFF,
                            *map(ord, "[]{}:,")])

# byte -> next state, for the number states (keywords only continue with a-z)
_TRANSITIONS: dict[int, dict[int, int]] = {
    _ZERO: {ord("."): _MANTISSA},
    _SIGN: {_D0: _ZERO, **{d: _DIGITS for d in range(_D0 + 1, _D9 + 1)}},
    _DIGITS: {ord("."): _MANTISSA, ord("e"): _EXP_E, ord("E"): _EXP_E},
    _MANTISSA: {d: _MANTISSA_DIGITS for d in range(_D0, _D9 + 1)},
    _MANTISSA_DIGITS: {ord("e"): _EXP_E, ord("E"): _EXP_E},
    _EXP_E: {ord("-"): _EXP_SIGN, ord("+"): _EXP_SIGN,
             **{d: _EXP_DIGITS for d in range(_D0, _D9 + 1)}},
    _EXP_SIGN: {d: _EXP_DIGITS for d in range(_D0, _D9 + 1)},
    _EXP_DIGITS: {},
    _KEYWORD: {},
}

# states in which any other byte ends the token (it is then re-read)
_FINAL = {_ZERO: INTEGER, _DIGITS: INTEGER, _MANTISSA_DIGITS: FLOAT,
          _EXP_DIGITS: FLOAT, _KEYWORD: KEYWORD}
