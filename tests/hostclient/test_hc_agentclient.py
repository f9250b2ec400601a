"""The agent client: framing, resync, timeouts, typed helpers.

Against the pure ReplyStream, a scriptable fake agent (faults a real guest
cannot produce on demand) and the real qemu-ga 7.2 on a unix socket (with
every command that would touch this host blocked).
"""

from __future__ import annotations

import socket
import time

import pytest

from hostclient.agentclient import AgentClient, AgentTimeouts, ReplyStream, decode_reply
from hostclient.errors import (
    AgentCommandError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
)

FAST = AgentTimeouts(connect=2, sync=1, ping=1, freeze=1, thaw=1, status=1, default=1)


# ------------------------------------------------------------ ReplyStream


def test_stream_drops_everything_before_the_delimiter():
    s = ReplyStream()
    s.feed(b'{"return": 1}\ngarbage\x00{"half')
    assert s.skip_to_delimiter() is False         # no 0xFF yet: all garbage, dropped
    assert s.line() is None
    s.feed(b'more junk\xff{"return": 42}\n{"return": {}, "id": 1}\n')
    assert s.skip_to_delimiter() is True
    assert s.line() == b'{"return": 42}'
    assert s.line() == b'{"return": {}, "id": 1}'
    assert s.line() is None


def test_stream_splits_lines_across_feeds():
    s = ReplyStream()
    s.feed(b'{"ret')
    assert s.line() is None
    s.feed(b'urn": 3}\n{"return"')
    assert s.line() == b'{"return": 3}'
    assert s.line() is None


def test_stream_bounds_memory():
    s = ReplyStream(limit=1024)
    with pytest.raises(AgentProtocolError, match="without a line end"):
        s.feed(b"x" * 2048)
    assert s.line() is None


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'{"return": \xff}'])
def test_decode_reply_rejects_garbage(line):
    with pytest.raises(AgentProtocolError):
        decode_reply(line)


# ------------------------------------------------------------ fake agent


def test_sync_skips_garbage_and_stale_replies(fake_agent):
    fake_agent.faults.garbage_on_connect = (
        b'{"return": {}, "id": "old"}\n\xff{"return": 12345}\nnoise\x01\x02')
    with AgentClient(fake_agent.path, FAST) as agent:
        agent.ping()
        assert agent.fsfreeze_status() == "thawed"
    assert fake_agent.received[:2] == ["guest-sync-delimited", "guest-ping"]


def test_error_reply_carries_class_and_desc(fake_agent):
    with AgentClient(fake_agent.path, FAST) as agent:
        with pytest.raises(AgentCommandError) as info:
            agent.execute("guest-no-such-thing")
        assert info.value.error_class == "CommandNotFound"
        assert "has not been found" in info.value.desc
        agent.ping()                              # the channel is still in step


def test_timeout_then_late_reply_is_skipped(fake_agent):
    fake_agent.faults.freeze_delay = 1.5
    with AgentClient(fake_agent.path, FAST) as agent:
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match="guest-fsfreeze-freeze within 0.5 s"):
            agent.fsfreeze_freeze(timeout=0.5)
        assert time.monotonic() - started < 1.2
        # the agent is still busy freezing: the status poll waits for it and
        # reports the late freeze; the stale freeze reply must not be taken
        # for the status reply
        assert agent.status_after_timeout(timeout=3) == "frozen"
        assert agent.fsfreeze_thaw() == 2
        assert agent.fsfreeze_status() == "thawed"


def test_status_after_timeout_is_none_while_the_agent_hangs(fake_agent):
    fake_agent.faults.hang_on = "guest-fsfreeze-freeze"
    fake_agent.faults.silent = False
    with AgentClient(fake_agent.path, FAST) as agent:
        with pytest.raises(AgentTimeout):
            agent.fsfreeze_freeze(timeout=0.3)
        fake_agent.faults.silent = True            # now it answers nothing at all
        assert agent.status_after_timeout(timeout=0.5) is None


def test_silent_agent_times_out_on_connect_with_a_hint(fake_agent):
    fake_agent.faults.silent = True
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="is the guest agent running"):
        AgentClient(fake_agent.path, FAST).connect()
    assert time.monotonic() - started < 2.5


def test_a_lost_sync_request_is_sent_again(fake_agent):
    # the first guest-sync-delimited vanishes (as when the guest sees the
    # previous client's hang-up after the new client's bytes): the client
    # sends another after SYNC_RESEND and is in step with the agent
    fake_agent.faults.lose = 1
    started = time.monotonic()
    with AgentClient(fake_agent.path, AgentTimeouts(sync=4, ping=1)) as agent:
        assert 0.9 < time.monotonic() - started < 2.5
        agent.ping()
        assert agent.fsfreeze_status() == "thawed"
    assert fake_agent.received[:3] == ["guest-sync-delimited"] * 2 + ["guest-ping"]


def test_answers_to_repeated_syncs_are_skipped(fake_agent):
    # a slow agent answers every sync it was sent, late: the client takes the
    # first answer and skips the later delimited ones before its command's reply
    fake_agent.faults.on_command = lambda name: time.sleep(1.3) if name.endswith("delimited") \
        and fake_agent.received.count(name) == 1 else None
    with AgentClient(fake_agent.path, AgentTimeouts(sync=4, ping=2, status=2)) as agent:
        agent.ping()
        assert agent.fsfreeze_status() == "thawed"
    assert fake_agent.received.count("guest-sync-delimited") == 2


def test_missing_socket_is_unavailable(sockdir):
    with pytest.raises(AgentUnavailable, match="no guest agent socket"):
        AgentClient(str(sockdir / "nope.sock"), FAST).connect()


def test_socket_nobody_listens_on_is_unavailable(sockdir):
    path = sockdir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                                    # bound, never listening
    with pytest.raises(AgentUnavailable, match="cannot connect"):
        AgentClient(str(path), FAST).connect()


def test_channel_closed_mid_command_is_unavailable(fake_agent):
    fake_agent.faults.close_on = "guest-fsfreeze-freeze"
    with AgentClient(fake_agent.path, FAST) as agent:
        with pytest.raises(AgentUnavailable, match="closed"):
            agent.fsfreeze_freeze()
        assert not agent.connected
        agent.connect()                          # and it can come back
        agent.ping()


def test_freeze_list_and_thaw_helpers(fake_agent):
    with AgentClient(fake_agent.path, FAST) as agent:
        assert agent.fsfreeze_freeze(["/a", "/b", "/c"]) == 3
        assert fake_agent.received[-1] == "guest-fsfreeze-freeze-list"
        assert agent.fsfreeze_status() == "frozen"
        with pytest.raises(AgentCommandError, match="frozen state"):
            agent.execute("guest-get-osinfo")
        assert agent.fsfreeze_thaw() == 3
        assert agent.fsfreeze_thaw() == 0


def test_freeze_failure_is_a_command_error(fake_agent):
    fake_agent.faults.freeze_error = "failed to freeze /data: Device or resource busy"
    with AgentClient(fake_agent.path, FAST) as agent:
        with pytest.raises(AgentCommandError, match="failed to freeze /data"):
            agent.fsfreeze_freeze()
        assert agent.fsfreeze_status() == "thawed"


def test_info_is_typed(fake_agent):
    with AgentClient(fake_agent.path, FAST) as agent:
        info = agent.info()
    assert info.version == "7.2.99-fake"
    assert info.supports("guest-fsfreeze-freeze")
    assert not info.supports("guest-exec")


def test_no_reply_command_returns_after_sync(fake_agent):
    with AgentClient(fake_agent.path, FAST) as agent:
        assert agent.execute("guest-shutdown") is None
        agent.ping()
    assert fake_agent.shutdown_requested


def test_timeouts_per_command():
    t = AgentTimeouts(ping=1, freeze=99, thaw=7, default=30)
    assert t.for_command("guest-ping") == 1
    assert t.for_command("guest-fsfreeze-freeze-list") == 99
    assert t.for_command("guest-fsfreeze-thaw") == 7
    assert t.for_command("guest-get-osinfo") == 30


# --------------------------------------------------------- real qemu-ga


@pytest.mark.oracle
def test_real_qemu_ga_sync_ping_info_status(host_qemu_ga):
    with AgentClient(host_qemu_ga, FAST) as agent:
        agent.ping()
        info = agent.info()
        assert info.version.startswith("7.2")
        assert info.supports("guest-ping")
        assert not info.supports("guest-fsfreeze-freeze")    # blocked by the fixture
        assert agent.fsfreeze_status() == "thawed"
        with pytest.raises(AgentCommandError) as err:
            agent.execute("guest-fsfreeze-freeze")
        assert err.value.error_class == "CommandNotFound"
        assert err.value.desc == "Command guest-fsfreeze-freeze has been disabled"


@pytest.mark.oracle
def test_real_qemu_ga_recovers_from_a_half_request_of_an_earlier_client(host_qemu_ga):
    # qemu-ga keeps its parser state across clients: a partial request left
    # behind swallows the next client's commands unless it sends 0xFF first.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(host_qemu_ga)
        s.sendall(b'{"execute": "guest-ping", "arguments": {"x": [1, {"y": "')
        time.sleep(0.2)
    with AgentClient(host_qemu_ga, FAST) as agent:
        agent.ping()
        assert agent.execute("guest-get-timezone")["offset"] is not None


@pytest.mark.oracle
def test_real_qemu_ga_argument_errors_are_mapped(host_qemu_ga):
    with AgentClient(host_qemu_ga, FAST) as agent:
        with pytest.raises(AgentCommandError, match="Parameter 'id' is missing"):
            agent.execute("guest-sync")
        with pytest.raises(AgentCommandError, match="has not been found"):
            agent.execute("guest-bogus")
        assert agent.execute("guest-sync", {"id": 7}) == 7


@pytest.mark.oracle
def test_real_qemu_ga_error_for_a_no_reply_command_is_raised(host_qemu_ga):
    # guest-shutdown answers nothing on success, but an error it does answer
    with AgentClient(host_qemu_ga, FAST) as agent:
        with pytest.raises(AgentCommandError, match="guest-shutdown has been disabled"):
            agent.execute("guest-shutdown")
        agent.ping()
