"""guest-file-*: handles, read/write/seek semantics, limits, the persistent counter."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from agent.commands.files import READ_COUNT_MAX, read_fd_counter
from agent.platform import Platform

from qga_helpers import agent_call, make_ctx


@pytest.fixture
def ctx(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    return make_ctx(Platform(), state)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_round_trip_as_qemus_own_unit_test(ctx, tmp_path):
    path = str(tmp_path / "foo")
    payload = b"Hello World!\n\0"
    handle = agent_call(ctx, "guest-file-open", path=path, mode="w+")["return"]
    assert handle == 1000
    assert agent_call(ctx, "guest-file-write", handle=handle, **{"buf-b64": b64(payload)}) == \
        {"return": {"count": 14, "eof": False}}
    # reading right after writing: at the end, nothing left
    assert agent_call(ctx, "guest-file-read", handle=handle) == \
        {"return": {"count": 0, "buf-b64": "", "eof": True}}
    assert agent_call(ctx, "guest-file-flush", handle=handle) == {"return": {}}
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=0, whence="set") == \
        {"return": {"position": 0, "eof": False}}
    assert agent_call(ctx, "guest-file-read", handle=handle) == \
        {"return": {"count": 14, "buf-b64": b64(payload), "eof": True}}
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=6, whence=0) == \
        {"return": {"position": 6, "eof": False}}
    assert agent_call(ctx, "guest-file-read", handle=handle, count=3) == \
        {"return": {"count": 3, "buf-b64": b64(b"Wor"), "eof": False}}
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=-2, whence="end") == \
        {"return": {"position": 12, "eof": False}}
    assert agent_call(ctx, "guest-file-close", handle=handle) == {"return": {}}
    with open(path, "rb") as f:
        assert f.read() == payload
    assert agent_call(ctx, "guest-file-read", handle=handle) == \
        {"error": {"class": "GenericError", "desc": "handle '1000' has not been found"}}


def test_new_files_get_0666_whatever_the_umask_existing_keep_theirs(ctx, tmp_path):
    new = tmp_path / "new"
    old = tmp_path / "old"
    old.write_bytes(b"x")
    old.chmod(0o600)
    mask = os.umask(0o077)
    try:
        agent_call(ctx, "guest-file-open", path=str(new), mode="a")
        agent_call(ctx, "guest-file-open", path=str(old), mode="w")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_bytes() == b""  # w truncates


def test_open_errors(ctx, tmp_path):
    missing = str(tmp_path / "missing")
    assert agent_call(ctx, "guest-file-open", path=missing)["error"]["desc"] == \
        f"failed to open file '{missing}' (mode: 'r'): No such file or directory"
    assert agent_call(ctx, "guest-file-open", path=missing, mode="rw")["error"]["desc"] == \
        "invalid file open mode 'rw'"
    assert not os.path.exists(missing)


@pytest.mark.parametrize("mode", ["r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b",
                                  "w+", "wb+", "w+b", "a+", "ab+", "a+b"])
def test_every_mode_qemu_ga_accepts(ctx, tmp_path, mode):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    handle = agent_call(ctx, "guest-file-open", path=str(path), mode=mode)["return"]
    write = agent_call(ctx, "guest-file-write", handle=handle, **{"buf-b64": b64(b"AB")})
    if mode.startswith("r") and "+" not in mode:
        assert write == {"error": {"class": "GenericError",
                                   "desc": "failed to write to file: Bad file descriptor"}}
    else:
        assert write == {"return": {"count": 2, "eof": False}}
    expected = {"r": b"0123456789", "w": b"AB", "a": b"0123456789AB"}
    plus = {"r": b"AB23456789"}
    got = path.read_bytes()
    assert got == (plus[mode[0]] if "+" in mode and mode[0] == "r" else expected[mode[0]])


def test_read_count_limits(ctx, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    handle = agent_call(ctx, "guest-file-open", path=str(path))["return"]
    for bad in (-1, READ_COUNT_MAX + 1):
        assert agent_call(ctx, "guest-file-read", handle=handle, count=bad)["error"]["desc"] == \
            f"value '{bad}' is invalid for argument count"
    assert agent_call(ctx, "guest-file-read", handle=handle, count=0) == \
        {"return": {"count": 0, "buf-b64": "", "eof": False}}
    assert agent_call(ctx, "guest-file-read", handle=handle, count=READ_COUNT_MAX)["return"] == \
        {"count": 3, "buf-b64": b64(b"abc"), "eof": True}


def test_write_count_and_base64_checks(ctx, tmp_path):
    handle = agent_call(ctx, "guest-file-open", path=str(tmp_path / "f"), mode="w")["return"]
    write = lambda **a: agent_call(ctx, "guest-file-write", handle=handle, **a)  # noqa: E731
    assert write(**{"buf-b64": "WFla", "count": 2}) == {"return": {"count": 2, "eof": False}}
    assert write(**{"buf-b64": "WFla", "count": 4})["error"]["desc"] == \
        "value '4' is invalid for argument count"
    assert write(**{"buf-b64": "!!!"})["error"]["desc"] == "Base64 data contains invalid characters"
    # the handle is looked up before the data is decoded
    assert agent_call(ctx, "guest-file-write", handle=7, **{"buf-b64": "!!!"})["error"]["desc"] == \
        "handle '7' has not been found"


def test_seek_errors(ctx, tmp_path):
    handle = agent_call(ctx, "guest-file-open", path=str(tmp_path / "f"), mode="w+")["return"]
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=0, whence=7)["error"]["desc"] == \
        "invalid whence code 7"
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=-5, whence="set")["error"][
        "desc"] == "failed to seek file: Invalid argument"
    assert agent_call(ctx, "guest-file-seek", handle=handle, offset=100, whence="set") == \
        {"return": {"position": 100, "eof": False}}


def test_directory_opens_but_does_not_read(ctx, tmp_path):
    handle = agent_call(ctx, "guest-file-open", path=str(tmp_path))["return"]
    assert agent_call(ctx, "guest-file-read", handle=handle)["error"]["desc"] == \
        "failed to read file: Is a directory"


def test_fifo_does_not_hang_the_agent(ctx, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handle = agent_call(ctx, "guest-file-open", path=str(fifo), mode="r")["return"]
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert agent_call(ctx, "guest-file-read", handle=handle)["error"]["desc"] == \
            "failed to read file: Resource temporarily unavailable"
        os.write(writer, b"partial")
        # qemu-ga would fail here and drop the bytes; we return them
        assert agent_call(ctx, "guest-file-read", handle=handle)["return"] == \
            {"count": 7, "buf-b64": b64(b"partial"), "eof": False}
    finally:
        os.close(writer)


def test_handles_persist_across_restarts(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    target = str(tmp_path / "f")
    first = make_ctx(Platform(), state)
    assert [agent_call(first, "guest-file-open", path=target, mode="w")["return"]
            for _ in range(3)] == [1000, 1001, 1002]
    assert (state / "qga.state").read_text() == "[global]\nfd_counter=1003\n"
    restarted = make_ctx(Platform(), state)  # a new agent: fresh handle table
    assert agent_call(restarted, "guest-file-open", path=target)["return"] == 1003
    assert agent_call(restarted, "guest-file-read", handle=1000)["error"]["desc"] == \
        "handle '1000' has not been found"


def test_counter_file_written_by_qemu_ga_is_understood(tmp_path):
    (tmp_path / "qga.state").write_text("[global]\nfd_counter=1234\n")
    assert read_fd_counter(str(tmp_path)) == 1234
    (tmp_path / "qga.state").write_text("garbage")
    assert read_fd_counter(str(tmp_path)) == 1000


def test_unwritable_statedir_is_qemu_gas_error_and_leaks_nothing(tmp_path):
    ctx = make_ctx(Platform(), tmp_path / "no-such-dir")
    before = len(os.listdir("/proc/self/fd"))
    assert agent_call(ctx, "guest-file-open", path=str(tmp_path))["error"]["desc"] == \
        "failed to commit persistent state to disk"
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.slow
def test_48_mib_read_in_one_call(ctx, tmp_path):
    path = tmp_path / "big"
    data = os.urandom(1 << 20) * 48
    path.write_bytes(data)
    handle = agent_call(ctx, "guest-file-open", path=str(path))["return"]
    got = agent_call(ctx, "guest-file-read", handle=handle, count=READ_COUNT_MAX)["return"]
    assert got["count"] == len(data) and got["eof"] is False
    assert base64.b64decode(got["buf-b64"]) == data


@pytest.mark.oracle
def test_same_answers_as_qemu_ga(reference_agent, tmp_path):
    """One scripted session against both agents: identical answers except the handles."""
    ours = make_ctx(Platform(), tmp_path)
    workdir = reference_agent.workdir

    def script(call, base):
        results = []
        (base / "ro.txt").write_bytes(b"0123456789abcdef")
        h = call("guest-file-open", path=str(base / "rt.txt"), mode="w+")["return"]
        for step in (
            ("guest-file-write", {"buf-b64": "aGVsbG8gd29ybGQK"}),
            ("guest-file-write", {"buf-b64": "WFla", "count": 2}),
            ("guest-file-write", {"buf-b64": "WFla", "count": 10}),
            ("guest-file-write", {"buf-b64": "!!!notbase64"}),
            ("guest-file-write", {"buf-b64": "aGk"}),          # glib drops the short group
            ("guest-file-write", {"buf-b64": "aG=k"}),         # '=' inside the data
            ("guest-file-write", {"buf-b64": "YQ==YQ=="}),
            ("guest-file-write", {"buf-b64": "aGk=\naGk="}),
            ("guest-file-flush", {}),
            ("guest-file-seek", {"offset": 0, "whence": "set"}),
            ("guest-file-read", {}),
            ("guest-file-read", {}),
            ("guest-file-seek", {"offset": 6, "whence": 0}),
            ("guest-file-read", {"count": 3}),
            ("guest-file-seek", {"offset": 0, "whence": "cur"}),
            ("guest-file-seek", {"offset": -2, "whence": "end"}),
            ("guest-file-seek", {"offset": 100, "whence": "set"}),
            ("guest-file-seek", {"offset": -1, "whence": "set"}),
            ("guest-file-seek", {"offset": 0, "whence": 7}),
            ("guest-file-read", {"count": 0}),
            ("guest-file-read", {"count": -1}),
            ("guest-file-read", {"count": 50331649}),
            ("guest-file-close", {}),
            ("guest-file-read", {}),
            ("guest-file-close", {}),
        ):
            results.append(call(step[0], handle=h, **step[1]))
        results.append((base / "rt.txt").read_bytes())
        r = call("guest-file-open", path=str(base / "ro.txt"))["return"]
        results.append(call("guest-file-write", handle=r, **{"buf-b64": "aGk="}))
        results.append(call("guest-file-read", handle=r, count=10))
        results.append(call("guest-file-read", handle=r, count=10))
        results.append(call("guest-file-close", handle=r))
        d = call("guest-file-open", path=str(base))["return"]
        results.append(call("guest-file-read", handle=d))
        results.append(call("guest-file-close", handle=d))
        results.append(call("guest-file-open", path=str(base / "missing")))
        results.append(call("guest-file-open", path=str(base / "ro.txt"), mode="zz"))
        results.append(call("guest-file-open", path="relative-missing.txt"))
        return [_unbase(r, base) for r in results]

    theirs = script(reference_agent.request, workdir)
    mine = script(lambda name, **a: agent_call(ours, name, **a), tmp_path)
    assert mine == theirs


def _unbase(result, base):
    """Results without the directory name, so two agents' sessions compare."""
    if isinstance(result, dict) and "error" in result:
        desc = result["error"]["desc"].replace(str(base), "BASE")
        return {"error": {**result["error"], "desc": desc}}
    return result
