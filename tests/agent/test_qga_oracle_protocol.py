"""qga and the real qemu-ga side by side: the same bytes in, the same bytes out.

Every case is sent to both agents on one connection each, followed by a
0xFF + guest-sync-delimited, and everything before the resync's answer
must be byte-identical.  Machine-changing commands are blocked in both.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.oracle

CASES = [
    b'{"execute": "guest-ping"}\n',
    b'{"execute":"guest-ping"}',
    b'{"execute": "guest-info"}',
    b'{"execute": "guest-sync", "arguments": {"id": 123456789}}',
    b'{"execute": "guest-sync", "arguments": {"id": -42}}',
    b'{"execute": "guest-sync", "arguments": {"id": 9223372036854775807}}',
    b'{"execute": "guest-sync", "arguments": {"id": 9223372036854775808}}',
    b'{"execute": "guest-sync", "arguments": {"id": 1.5}}',
    b'{"execute": "guest-sync", "arguments": {"id": 1e3}}',
    b'{"execute": "guest-sync", "arguments": {"id": -0}}',
    b'{"execute": "guest-sync", "arguments": {"id": 007}}',
    b'{"execute": "guest-sync-delimited", "arguments": {"id": 987654321}}',
    b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 55555}}',
    b'{"execute": "guest-sync-delimited"}',
    b'\xff',
    b'{"execute": "gue\xff{"execute": "guest-ping"}\n',
    b'{"execute": "guest-no-such-command"}',
    b'{"execute": "guest-shutdown"}',
    b'{"execute": "guest-fsfreeze-freeze"}',
    b'{"execute": "guest-get-devices"}',
    b'{"execute": "guest-sync"}',
    b'{"execute": "guest-sync", "arguments": {"id": "abc"}}',
    b'{"execute": "guest-ping", "arguments": {"foo": 1}}',
    b'{"execute": "guest-ping", "arguments": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, '
    b'"g": 7, "h": 8, "i": 9, "j": 10, "k": 11}}',
    b'{"execute": "guest-sync", "arguments": {"id": 1, "foo": 1}}',
    b'{"execute": "guest-ping", "arguments": [1]}',
    b'{"execute": "guest-ping", "arguments": null}',
    b'{"execute": "guest-ping", "arguments": {}}',
    b'{"execute": 1}',
    b'{"execute": "guest-ping", "foo": 1}',
    b'{"exec-oob": "guest-ping"}',
    b'{"execute": "guest-ping", "exec-oob": "guest-ping"}',
    b'{"arguments": 1, "execute": 1, "zz": 2}',
    b'{"execute": guest-ping}\n',
    b'hello\n',
    b'{"execute" "guest-ping"}',
    b'{"execute": "guest-ping",}',
    b'}\n',
    b'[1, 2, 3]',
    b'[{"execute": "guest-ping"}]',
    b'42\n',
    b'"guest-ping"\n',
    b'null\n',
    b'{}',
    b"{'execute': 'guest-ping'}",
    b'{"execute": "guest-ping", "id": "abc-1"}',
    b'{"execute": "guest-sync", "arguments": {"id": 7}, "id": 99}',
    b'{"execute": "guest-ping", "id": {"a": [1, 2]}}',
    b'{"execute": "guest-ping", "id": 0.1}',
    b'{"execute": "guest-ping", "id": null}',
    b'{"execute": "guest-ping", "id": -18446744073709551615}',
    b'{"execute": "guest-no-such-command", "id": "e1"}',
    b'{"execute": "guest-sync", "id": "e2"}',
    b'{"id": 5}',
    b'{"execute": "guest-ping", "id": 1}{"execute": "guest-ping", "id": 2}',
    b'  \r\n\t{ "execute" :\r\n "guest-ping" }\r\n',
    b'{"execute": "guest-no-such\\u00e9\\ud83d\\ude00x\\u0001\\"\\\\/\x7f"}',
    b'{"execute": "guest-x", "arguments": {"path": "/tmp/\xc3("}}',
    b'{"execute": "\\uD800"}',
    b'{"execute": "\\u12"}',
    b'{"execute": "\\q"}',
    b'{"execute": "a\tb"}',
    b'{"execute": "a\x00b"}',
    b'\x00\n',
    b'{"execute": "guest-ping", "execute": "guest-info"}',
    b'{"a" 1}',
    b'[1 2]',
    b'{true: 1}',
    b'[' * 1100 + b']' * 1100,
    b'[' * 1024 + b']' * 1024,
    b'{"execute": "guest-exec-status", "arguments": {"pid": true}}',
    b'{"execute": "guest-file-read", "arguments": {"handle": 1, "count": 1}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": "middle"}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": true}}',
    b'{"execute": "guest-fsfreeze-status"}',
    b'{"execute": "guest-fsfreeze-thaw"}',
    b'{"execute": "guest-get-time", "arguments": {"x": null}}',
    b'{"execute": "guest-get-host-name"}',
    b'{"execute": "guest-get-timezone", "id": [1]}',
    b'{"execute": "guest-ssh-get-authorized-keys", "arguments": {"username": "no-such-user-qga"}}',
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_same_bytes_as_qemu_ga(agents, case):
    ref, ours = agents
    assert ours.exchange(case) == ref.exchange(case)


def test_guest_info_is_byte_identical(agents):
    ref, ours = agents
    request = b'{"execute": "guest-info", "id": "info"}'
    assert ours.call(request) == ref.call(request)


FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"0", b"00", b"-",
             b"1", b".", b"e", b"+", b"true", b"null", b"fals", b"xyz", b'"execute"',
             b'"guest-ping"', b'"guest-sync"', b'"arguments"', b'"id"', b' ', b"\n", b"\t",
             b"\xff", b"\xfe", b"\x00", b"\xc3", b"\xa9", b"\xe2\x82\xac", b"\xc0\x80",
             b"\xed\xa0\x80", b"\x7f", b"%", b"9223372036854775808", b"1e400",
             b"\\uD83D\\uDE00", b"\\uD83D", b'"exec-oob"']

streams = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(min_size=1, max_size=3)),
                   max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=streams)
def test_fuzzed_streams_match_qemu_ga(agents, data):
    ref, ours = agents
    assert ours.exchange(data) == ref.exchange(data)
