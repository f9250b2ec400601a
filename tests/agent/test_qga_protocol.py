"""The sans-IO protocol: framing, 0xFF resync, limits, errors, encoding.

Expected bytes are qemu-ga 7.2's (checked against the real agent in
test_oracle_protocol.py); here they run without sockets.
"""

from __future__ import annotations

import pytest

from agent.jsonstream import MAX_NESTING
from agent.protocol import ParseError, Protocol, Request


def feed_all(chunks):
    proto = Protocol()
    events = []
    for chunk in chunks:
        events += proto.feed(chunk)
    return events


def test_requests_need_no_newline_and_may_share_a_read():
    events = feed_all([b'{"execute":"guest-ping","id":1}{"execute": "guest-ping", "id": 2}'])
    assert events == [Request({"execute": "guest-ping", "id": 1}),
                      Request({"execute": "guest-ping", "id": 2})]


def test_a_request_may_arrive_byte_by_byte():
    data = b'{"execute": "guest-sync", "arguments": {"id": 12345678901}}'
    events = feed_all([bytes([b]) for b in data])
    assert events == [Request({"execute": "guest-sync", "arguments": {"id": 12345678901}})]


def test_single_quotes_whitespace_and_crlf():
    events = feed_all([b"  \r\n\t{ 'execute' :\r\n 'guest-ping' }\r\n"])
    assert events == [Request({"execute": "guest-ping"})]


def test_0xff_resets_a_partial_request_and_is_reported():
    events = feed_all([b'{"execute": "gue', b'\xff{"execute":"guest-ping"}'])
    assert events == [ParseError("JSON parse error, stray '\"gue\ufffd'"),
                      Request({"execute": "guest-ping"})]


def test_lone_0xff():
    assert feed_all([b"\xff"]) == [ParseError("JSON parse error, stray '\ufffd'")]


def test_bare_word_gives_two_errors_as_qemu_ga():
    events = feed_all([b'{"execute": guest-ping}\n'])
    assert events == [ParseError("JSON parse error, stray '-p'"),
                      ParseError("JSON parse error, expecting value")]


@pytest.mark.parametrize("data, desc", [
    (b"hello\n", "JSON parse error, invalid keyword 'hello'"),
    (b'{"execute" "guest-ping"}', "JSON parse error, missing : in object pair"),
    (b'{"execute": "guest-ping",}', "JSON parse error, expecting value"),
    (b"}", "JSON parse error, expecting value"),
    (b'{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b"{true:1}", "JSON parse error, key is not a string in object"),
    (b'{"a":1,"a":2}', "JSON parse error, duplicate key"),
    (b'"\xc3("', "JSON parse error, invalid UTF-8 sequence in string"),
    (b'"\xef\xbf\xbe"', "JSON parse error, invalid UTF-8 sequence in string"),
    (b'"\\q"', "JSON parse error, invalid escape sequence in string"),
    (b'"\\uD800"', "JSON parse error, \\uD800 is not a valid Unicode character"),
    (b'"\\uD83D\\u0041"', "JSON parse error, \\uD83D is not a valid Unicode character"),
    (b'"\\u12"', 'JSON parse error, \\u12" is not a valid Unicode character'),
])
def test_parse_errors(data, desc):
    assert feed_all([data]) == [ParseError(desc)]


def test_values_and_numbers():
    (event,) = feed_all([b'["\\u00e9\\uD83D\\uDE00", -0, 9223372036854775807, '
                         b'18446744073709551615, 18446744073709551616, 1e3, 1.5, null, true, "\\u0000"]'])
    assert event.value == ["\u00e9\U0001F600", 0, 2**63 - 1, 2**64 - 1, float(2**64),
                           1000.0, 1.5, None, True, "\0"]
    assert isinstance(event.value[4], float)


def test_leading_zero_is_a_lexical_error():
    events = feed_all([b'{"id": 007}'])
    assert events == [ParseError("JSON parse error, stray '00'"),
                      ParseError("JSON parse error, expecting value")]


def test_nul_byte_ends_the_error_text_like_a_c_string():
    assert feed_all([b'"a\x00b"\n'])[0] == ParseError("JSON parse error, stray '\"a'")


def test_nesting_limit_then_recovery():
    events = feed_all([b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1) + b'{"execute":"guest-ping"}'])
    assert events[0] == ParseError("JSON nesting depth limit exceeded")
    assert events[-1] == Request({"execute": "guest-ping"})
    assert len(events) == 1 + MAX_NESTING + 1 + 1


def test_exactly_the_limit_is_accepted():
    (event,) = feed_all([b"[" * MAX_NESTING + b"]" * MAX_NESTING])
    assert isinstance(event, Request)


@pytest.mark.timeout(60)
def test_deep_nesting_200000_still_answers_after_resync():
    proto = Protocol()
    depth = 200_000
    events = proto.feed(b"[" * depth + b"]" * depth)
    # every 1025th '[' breaks the depth limit; what is left closes as a list
    assert sum(e == ParseError("JSON nesting depth limit exceeded") for e in events) == \
        depth // (MAX_NESTING + 1)
    assert proto.feed(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":7}}')[-1] == \
        Request({"execute": "guest-sync-delimited", "arguments": {"id": 7}})


@pytest.mark.timeout(120)
def test_a_64_mib_string_is_cut_at_the_token_size_limit():
    proto = Protocol()
    big = b'{"execute":"guest-ping","pad":"' + b"x" * (64 << 20) + b'"}'
    events = proto.feed(big)
    assert events[0] == ParseError("JSON token size limit exceeded")
    assert proto.pending_bytes < (1 << 20)
    events = proto.feed(b'\xff{"execute":"guest-ping"}')
    assert events[-1] == Request({"execute": "guest-ping"})


def test_a_64_mib_request_below_the_limit_is_read():
    payload = b"A" * ((64 << 20) - 200)
    (event,) = Protocol().feed(b'{"execute":"guest-ping","p":"' + payload + b'"}')
    assert isinstance(event, Request) and len(event.value["p"]) == len(payload)


def test_reset_drops_a_half_request():
    proto = Protocol()
    assert proto.feed(b'{"execute": "guest-ping", "id": "left-over"') == []
    proto.reset()
    assert proto.feed(b'{"execute":"guest-ping","id":"fresh"}') == \
        [Request({"execute": "guest-ping", "id": "fresh"})]


def test_encode_matches_qemu_ga_bytes():
    assert Protocol.encode({"return": {}, "id": "abc-1"}) == b'{"return": {}, "id": "abc-1"}\n'
    assert Protocol.encode({"error": {"class": "CommandNotFound", "desc": "x"}, "id": "e1"}) == \
        b'{"id": "e1", "error": {"class": "CommandNotFound", "desc": "x"}}\n'
    assert Protocol.encode({"return": 5}, delimited=True) == b'\xff{"return": 5}\n'
    assert Protocol.encode({"return": "a\tb\nc\x01d\"e\\f/g\u00e9h\U0001F600"}) == \
        b'{"return": "a\\tb\\nc\\u0001d\\"e\\\\f/g\\u00E9h\\uD83D\\uDE00"}\n'
    assert Protocol.encode({"return": 0.1}) == b'{"return": 0.10000000000000001}\n'


# ---------------------------------------------------------------- fast path

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from agent.jsonparse import fast_parse, parse_tokens  # noqa: E402
from agent.jsonstream import Message, MessageStream  # noqa: E402

_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
_numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(st.one_of(st.none(), st.booleans(), _numbers, _ascii),
                       lambda inner: st.one_of(st.lists(inner, max_size=4),
                                               st.dictionaries(_ascii, inner, max_size=4)),
                       max_leaves=12)


def _exact(data: bytes):
    items = MessageStream().feed(data)
    assert len(items) == 1 and isinstance(items[0], Message)
    return parse_tokens(items[0].tokens)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(_ascii, _values, max_size=5), compact=st.booleans())
def test_fast_path_reads_exactly_what_the_exact_reader_reads(value, compact):
    import json
    text = json.dumps(value, separators=(",", ":") if compact else (", ", ": "))
    data = text.encode()
    exact = _exact(data)
    fast = fast_parse(data, 0)
    if fast is not None:
        assert fast[1] == len(data)
        assert _same(fast[0], exact)


@pytest.mark.parametrize("data", [
    b'{"a": 1, "a": 2}', b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 01}', b'{"a": "\\u00e9"}',
    b"{'a': 1}", b'{"a": "\xc3\xa9"}', b'{"a": 1', b'{"a": [' + b"[" * 70 + b"]" * 70 + b"]}",
    b'{"a": "tab\there"}', b'{"a": tru}',
])
def test_fast_path_declines_what_it_cannot_read_exactly(data):
    assert fast_parse(data, 0) is None


# ---------------------------------------------------------------- robustness fuzz

from agent.commands import load_all  # noqa: E402
from agent.context import Context  # noqa: E402
from agent.dispatcher import Dispatcher  # noqa: E402
from agent.platform import Platform  # noqa: E402

from qga_harness import DANGEROUS  # noqa: E402

load_all()

_VALID = [b'{"execute":"guest-ping"}', b'{"execute":"guest-sync","arguments":{"id":5}}',
          b"{'execute':'guest-info','id':[1,{'a':null}]}",
          b'{"execute":"guest-file-seek","arguments":{"handle":1,"offset":-1,"whence":"cur"}}']


@st.composite
def _mutated(draw):
    data = bytearray(draw(st.sampled_from(_VALID)) * draw(st.integers(1, 3)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), _mutated()),
       cut=st.integers(min_value=1, max_value=50))
def test_random_and_mutated_streams_never_break_the_agent(data, cut):
    proto = Protocol()
    dispatcher = Dispatcher(Context(Platform()), blocked=DANGEROUS)
    for start in range(0, len(data), cut):
        for event in proto.feed(data[start:start + cut]):
            reply = dispatcher.handle(event)
            assert reply is None or reply.endswith(b"\n")
    events = proto.feed(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":99}}')
    assert dispatcher.handle(events[-1]) == b'\xff{"return": 99}\n'


@pytest.mark.parametrize("text", ["A" * 70000, "\u00e9\"\\\n\x01" * 20000, "x" * 65537 + "\udc80",
                                  "b64+/=" * 20000])
def test_big_strings_are_written_exactly_like_small_ones(text):
    from agent.jsonwrite import encode_chunks, string, to_json
    expected = '{"return": ' + string(text) + "}"
    assert to_json({"return": text}) == expected
    assert b"".join(encode_chunks({"return": text, "id": 1})) == \
        ('{"return": ' + string(text) + ', "id": 1}\n').encode()
