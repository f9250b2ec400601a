"""The catalogue through the whole agent: our ``qga`` daemon beside the real qemu-ga.

Both run with the same options on unix sockets and get the same bytes;
their answers must be the same bytes (member order included), except for
numbers that differ by nature (process ids, file handles, counters).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

from qga_helpers import start_agent, stop_agent

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def agents(reference_agent, tmp_path_factory):
    """(ours, theirs): our daemon started like the reference qemu-ga."""
    workdir = tmp_path_factory.mktemp("qga")
    proc, ours = start_agent([sys.executable, "-m", "agent"], workdir)
    ours.workdir = workdir
    try:
        yield ours, reference_agent
    finally:
        stop_agent(proc, ours)


def raw(client, message) -> bytes:
    """The response line for one request, as bytes."""
    client.sock.sendall(message if isinstance(message, bytes) else json.dumps(message).encode())
    return client.reply_line()


STABLE = ["guest-get-osinfo", "guest-get-host-name", "guest-get-timezone", "guest-get-users",
          "guest-get-vcpus", "guest-get-memory-block-info", "guest-get-memory-blocks",
          "guest-get-disks", "guest-get-devices"]


@pytest.mark.parametrize("name", STABLE)
def test_stable_answers_are_the_same_bytes(agents, name):
    ours, theirs = agents
    request = {"execute": name, "id": "x-1"}
    assert raw(ours, request) == raw(theirs, request)


MOVING = ["guest-get-fsinfo", "guest-network-get-interfaces", "guest-get-diskstats",
          "guest-get-cpustats", "guest-get-time"]


@pytest.mark.parametrize("name", MOVING)
def test_moving_answers_are_the_same_bytes_but_numbers(agents, name):
    ours, theirs = agents
    digits = re.compile(rb"-?\d+")
    assert digits.sub(b"N", raw(ours, {"execute": name})) == \
        digits.sub(b"N", raw(theirs, {"execute": name}))


@pytest.mark.parametrize("request_", [
    {"execute": "guest-file-open", "arguments": {"path": "/nonexistent/x", "mode": "r"}},
    {"execute": "guest-file-open", "arguments": {"path": "/tmp", "mode": "zz"}},
    {"execute": "guest-file-read", "arguments": {"handle": 1, "count": 1}},
    {"execute": "guest-file-read", "arguments": {"handle": 1, "count": "1"}},
    {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": "middle"}},
    {"execute": "guest-file-seek", "arguments": {"handle": 1, "offset": 0, "whence": 1.5}},
    {"execute": "guest-file-write", "arguments": {"handle": 1}},
    {"execute": "guest-exec", "arguments": {"path": "/bin/true", "capture-output": "yes"}},
    {"execute": "guest-exec", "arguments": {"path": "/bin/true", "arg": "x"}},
    {"execute": "guest-exec", "arguments": {"path": "/no/such/program"}},
    {"execute": "guest-exec", "arguments": {"path": "/bin/cat", "input-data": "@@@"}},
    {"execute": "guest-exec-status", "arguments": {"pid": 999999}},
    {"execute": "guest-exec-status", "arguments": {"pid": True}},
    {"execute": "guest-set-vcpus", "arguments": {"vcpus": [{"online": True}]}},
    {"execute": "guest-ssh-get-authorized-keys", "arguments": {"username": "no-such-user-xyz"}},
    {"execute": "guest-ssh-get-authorized-keys", "arguments": {"username": "root"}},
    {"execute": "guest-shutdown", "arguments": {"mode": "off"}},
    {"execute": "guest-get-osinfo", "arguments": {"x": 1}},
    {"execute": "guest-fstrim", "arguments": {"minimum": 1}},
], ids=lambda r: r["execute"])
def test_errors_are_the_same_bytes(agents, request_):
    ours, theirs = agents
    assert raw(ours, request_) == raw(theirs, request_)


def test_file_session_is_the_same_bytes(agents, tmp_path):
    ours, theirs = agents
    target = tmp_path / "f.txt"
    numbers = re.compile(rb"\"return\": \d+|handle '\d+'")

    def session(client):
        out = []
        handle = json.loads(raw(client, {"execute": "guest-file-open",
                                         "arguments": {"path": str(target), "mode": "w+"}}))
        handle = handle["return"]
        for name, args in [("guest-file-write", {"buf-b64": "aGVsbG8gd29ybGQK"}),
                           ("guest-file-seek", {"offset": 0, "whence": "set"}),
                           ("guest-file-read", {"count": 5}),
                           ("guest-file-read", {}),
                           ("guest-file-seek", {"offset": -3, "whence": 2}),
                           ("guest-file-flush", {}),
                           ("guest-file-close", {}),
                           ("guest-file-close", {})]:
            out.append(numbers.sub(b"N", raw(client, {"execute": name,
                                                       "arguments": {"handle": handle, **args}})))
        return out

    assert session(ours) == session(theirs)


def test_exec_session_is_the_same_bytes(agents):
    ours, theirs = agents

    def session(client):
        pid = json.loads(raw(client, {"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", "echo out; echo err >&2; exit 3"],
            "capture-output": True}}))["return"]["pid"]
        deadline = time.monotonic() + 10
        while True:
            line = raw(client, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
            if b'"exited": true' in line:
                return line
            assert time.monotonic() < deadline
            time.sleep(0.01)

    assert session(ours) == session(theirs)


def test_guest_info_lists_the_catalogue_like_qemu_ga(agents):
    ours, theirs = agents
    assert raw(ours, {"execute": "guest-info"}) == raw(theirs, {"execute": "guest-info"})


def test_odd_strings_reach_the_os_as_qemu_ga_passes_them(agents, tmp_path):
    """U+0000 travels as the bytes C0 80 (QEMU's modified UTF-8), other
    characters as UTF-8: the same file names, errors and lookups."""
    ours, theirs = agents
    numbers = re.compile(rb'"return": \d+')
    names = [r"x\u0000y", r"caf\u00e9", r"em\ud83d\ude00j"]
    answers, listings = [], []
    for client, sub in ((ours, "a"), (theirs, "b")):
        (tmp_path / sub).mkdir()
        replies = [numbers.sub(b"N", raw(client, (
            '{"execute": "guest-file-open", "arguments": {"path": "%s/%s", "mode": "w"}}'
            % (tmp_path / sub, name)).encode())) for name in names]
        replies.append(raw(client, rb'{"execute": "guest-exec", "arguments": {"path": "/no/\u0000x"}}'))
        replies.append(raw(client, rb'{"execute": "guest-ssh-get-authorized-keys", '
                                   rb'"arguments": {"username": "a\u0000b"}}'))
        answers.append(replies)
        listings.append(sorted(os.listdir(os.fsencode(tmp_path / sub))))
    assert answers[0] == answers[1]
    assert listings[0] == listings[1] == [b"caf\xc3\xa9", b"em\xf0\x9f\x98\x80j", b"x\xc0\x80y"]
