"""The daemon: start-up failures, signals, pidfile, clients, frozen restarts,
systemd integration, and input that qemu-ga handles badly.

Where qemu-ga's behaviour is the reference the real agent runs beside ours.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qga_harness import QGA, Client, spawn_agent, sync_marker

pytestmark = pytest.mark.timeout(120)


def run_agent(command, args, cwd, timeout=10, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "NOTIFY_SOCKET")}
    full_env["QGA_CONF"] = "/nonexistent/qga.conf"
    full_env.update(env or {})
    try:
        result = subprocess.run([*command, *args], capture_output=True, cwd=cwd, env=full_env,
                                timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return "timeout", lines(exc.stderr or b"")
    return result.returncode, lines(result.stderr)


def lines(stderr: bytes) -> list[str]:
    """The critical/warning lines without timestamps (debug lines are ours to vary)."""
    out = []
    for line in stderr.decode(errors="replace").splitlines():
        line = re.sub(r"^\d+\.\d{6}: ", "", line)
        if line.startswith(("critical:", "warning:", "error:")):
            out.append(re.sub(r"\.[A-Za-z0-9]{6}\u201d", ".XXXXXX\u201d", line))
    return out


STARTUP_FAILURES = [
    ("bind", ["-m", "unix-listen", "-p", "{tmp}/nodir/x.sock", "-t", "{tmp}"]),
    ("statedir", ["-m", "unix-listen", "-p", "{tmp}/s.sock", "-t", "{tmp}/nostate"]),
    ("virtio", ["-m", "virtio-serial", "-p", "{tmp}/no-such-dev", "-t", "{tmp}"]),
    ("isa", ["-m", "isa-serial", "-p", "{tmp}/no-such-tty", "-t", "{tmp}"]),
    ("method", ["-m", "bogus", "-p", "/tmp/x", "-t", "{tmp}"]),
    ("vsock-address", ["-m", "vsock-listen", "-p", "notanaddr", "-t", "{tmp}"]),
    ("vsock-trailing", ["-m", "vsock-listen", "-p", "1:2,x", "-t", "{tmp}"]),
    ("logfile", ["-m", "unix-listen", "-p", "{tmp}/l.sock", "-t", "{tmp}",
                 "-l", "/nonexistent/dir/log"]),
]


@pytest.mark.oracle
@pytest.mark.parametrize("name, args", STARTUP_FAILURES, ids=[n for n, _ in STARTUP_FAILURES])
def test_startup_failures_match_qemu_ga(qemu_ga, tmp_path, name, args):
    results = []
    for command in ([qemu_ga], QGA):
        tmp = tmp_path / Path(command[-1]).name
        tmp.mkdir()
        argv = [a.format(tmp=tmp) for a in args]
        code, err = run_agent(command, argv, tmp)
        results.append((code, [e.replace(str(tmp), "TMP") for e in err]))
    assert results[1] == results[0]


def test_relative_statedir_is_refused(tmp_path):
    code, _ = run_agent(QGA, ["-m", "unix-listen", "-p", str(tmp_path / "s"), "-t", "rel"], tmp_path)
    assert code == 1


@pytest.mark.slow
def test_retry_path_waits_for_the_path_to_appear(tmp_path):
    sock = tmp_path / "later" / "s"
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([*QGA, "-r", "-m", "unix-listen", "-p", str(sock), "-t", str(tmp_path)],
                                stderr=err, env={**os.environ, "QGA_CONF": "/nonexistent"})
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "-r must keep the agent alive"
        sock.parent.mkdir()
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        client = Client(str(sock))
        assert client.call(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert "failed to initialize guest agent channel" in (tmp_path / "err").read_text()


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 0),
                                            (signal.SIGHUP, -signal.SIGHUP)])
def test_signals(start_agent, signum, status):
    agent = start_agent("qga")
    agent.proc.send_signal(signal.SIGPIPE)  # ignored
    time.sleep(0.2)
    assert agent.proc.poll() is None
    agent.proc.send_signal(signum)
    assert agent.proc.wait(10) == status


# ---------------------------------------------------------------- frozen restart

HOOK = """#!/bin/sh
echo "$1 $(pwd)" >> "{log}"
exit ${{HOOK_RC:-0}}
"""


@pytest.mark.oracle
def test_agent_restarted_while_frozen_behaves_like_qemu_ga(qemu_ga, tmp_path):
    """Both agents start with the frozen marker, as after a crash mid-freeze."""
    transcripts = {}
    for name, command in (("qemu-ga", [qemu_ga]), ("qga", QGA)):
        work = tmp_path / name
        state = work / "state"
        state.mkdir(parents=True)
        (state / "qga.state.isfrozen").touch()
        hook = work / "hook.sh"
        hook.write_text(HOOK.format(log=work / "hook.log"))
        hook.chmod(0o755)
        agent = spawn_agent(command, work, name, ["-F" + str(hook), "-l", str(work / "agent.log")],
                            block=("guest-shutdown", "guest-get-osinfo"), statedir=state)
        try:
            client = agent.connect()
            seen = [client.call(r) for r in (
                b'{"execute":"guest-fsfreeze-status"}',
                b'{"execute":"guest-ping"}',
                b'{"execute":"guest-get-host-name"}',
                b'{"execute":"guest-get-osinfo"}',
                b'{"execute":"guest-shutdown"}',
                b'{"execute":"guest-info"}')]
            agent.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            seen.append(agent.proc.poll() is None)          # SIGTERM ignored while frozen
            seen.append((work / "agent.log").exists())      # log file deferred
            seen.append(client.call(b'{"execute":"guest-fsfreeze-thaw"}'))
            seen += [client.call(r) for r in (
                b'{"execute":"guest-fsfreeze-status"}',
                b'{"execute":"guest-get-osinfo"}',
                b'{"execute":"guest-shutdown"}')]
            seen.append((state / "qga.state.isfrozen").exists())
            seen.append((work / "hook.log").read_text().replace(str(work), "W"))
            seen.append((work / "agent.log").exists())
            agent.proc.send_signal(signal.SIGTERM)
            seen.append(agent.proc.wait(10))
        finally:
            agent.stop()
        transcripts[name] = seen
    assert transcripts["qga"] == transcripts["qemu-ga"]
    assert transcripts["qga"][6] is True and transcripts["qga"][-1] == 0


@pytest.mark.oracle
def test_hook_failures_on_thaw_match_qemu_ga(qemu_ga, tmp_path):
    for variant in ("exit3", "not-executable"):
        got = []
        for name, command in (("qemu-ga", [qemu_ga]), ("qga", QGA)):
            work = tmp_path / variant / name
            state = work / "state"
            state.mkdir(parents=True)
            (state / "qga.state.isfrozen").touch()
            hook = work / "hook.sh"
            hook.write_text(HOOK.format(log=work / "hook.log"))
            hook.chmod(0o644 if variant == "not-executable" else 0o755)
            agent = spawn_agent(command, work, name, ["-F" + str(hook)], statedir=state,
                                env={"HOOK_RC": "3"})
            try:
                client = agent.connect()
                got.append([client.call(b'{"execute":"guest-fsfreeze-thaw"}').replace(
                    str(hook).encode(), b"HOOK"), client.call(b'{"execute":"guest-fsfreeze-status"}')])
            finally:
                agent.stop()
        assert got[1] == got[0]


# ---------------------------------------------------------------- pidfile, daemon

def wait_path(path: Path, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)


def test_daemon_pidfile_lock_and_cleanup(tmp_path):
    pidfile = tmp_path / "qga.pid"
    env = {**os.environ, "QGA_CONF": "/nonexistent"}
    first = subprocess.run([*QGA, "-d", "-m", "unix-listen", "-p", str(tmp_path / "a.sock"),
                            "-t", str(tmp_path), "-f", str(pidfile)], env=env, timeout=10)
    assert first.returncode == 0                      # the parent returns at once
    wait_path(tmp_path / "a.sock")
    wait_path(pidfile)
    pid = int(pidfile.read_text())
    try:
        proc = psutil.Process(pid)
        assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
        assert proc.cwd() == "/"
        assert stat.S_IMODE((tmp_path / "a.sock").stat().st_mode) == 0o700   # umask 077
        second = subprocess.run([*QGA, "-d", "-m", "unix-listen", "-p", str(tmp_path / "b.sock"),
                                 "-t", str(tmp_path), "-f", str(pidfile)], env=env, timeout=10,
                                stderr=subprocess.PIPE)
        assert second.returncode == 0
        time.sleep(1.0)
        assert not (tmp_path / "b.sock").exists(), "a second daemon must not serve"
        assert int(pidfile.read_text()) == pid
        client = Client(str(tmp_path / "a.sock"))
        assert client.call(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
        client.close()
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not pidfile.exists()


def test_stale_pidfile_is_overwritten_and_foreground_ignores_it(tmp_path, start_agent):
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text("999999\n")
    agent = start_agent("qga", ["-f", str(pidfile)])       # foreground: pidfile untouched
    assert pidfile.read_text() == "999999\n"
    agent.stop()
    env = {**os.environ, "QGA_CONF": "/nonexistent"}
    sock = tmp_path / "d.sock"
    subprocess.run([*QGA, "-d", "-m", "unix-listen", "-p", str(sock),
                    "-t", str(tmp_path), "-f", str(pidfile)], env=env, timeout=10, check=True)
    try:
        wait_path(sock)
        deadline = time.monotonic() + 10
        while pidfile.read_text() == "999999\n":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if str(sock) in (proc.info["cmdline"] or []):
                proc.terminate()


def test_sd_notify_ready(tmp_path):
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(15)
    proc = subprocess.Popen([*QGA, "-m", "unix-listen", "-p", str(tmp_path / "s"), "-t", str(tmp_path)],
                            env={**os.environ, "NOTIFY_SOCKET": str(notify), "QGA_CONF": "/nonexistent"})
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message and f"MAINPID={proc.pid}" in message
        assert (tmp_path / "s").exists()
        proc.terminate()
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        listener.close()


def test_systemd_socket_activation(tmp_path):
    path = str(tmp_path / "activated.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    fd = server.fileno()
    # as systemd does: the socket on fd 3, LISTEN_PID naming the agent itself
    bootstrap = (f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                 f"os.environ['LISTEN_FDS'] = '1'; "
                 f"os.execv(sys.executable, [sys.executable, '-m', 'agent', '-t', {str(tmp_path)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", bootstrap], pass_fds=(fd,),
                            cwd=Path(__file__).parents[2], env={**os.environ, "QGA_CONF": "/nonexistent"})
    try:
        client = Client(path)
        assert client.call(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        server.close()


# ---------------------------------------------------------------- clients

@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["qemu-ga", "qga"])
def test_one_client_at_a_time(start_agent, kind):
    agent = start_agent(kind)
    a = agent.connect()
    assert a.call(b'{"execute":"guest-ping","id":"A1"}') == b'{"return": {}, "id": "A1"}\n'
    b = agent.connect()                                  # queued in the backlog
    b.send(b'{"execute":"guest-ping","id":"B1"}')
    assert b.read_for(0.5) == b""
    assert a.call(b'{"execute":"guest-ping","id":"A2"}') == b'{"return": {}, "id": "A2"}\n'
    a.close()
    assert b.read_until(b"\n") == b'{"return": {}, "id": "B1"}\n'


@pytest.mark.oracle
def test_partial_request_of_a_departed_client_is_forgotten(start_agent):
    """qemu-ga keeps the half request and swallows the next client's; qga does not."""
    for kind, answered in (("qemu-ga", False), ("qga", True)):
        agent = start_agent(kind)
        a = agent.connect()
        a.send(b'{"execute": "guest-ping", "id": "left-over"')
        time.sleep(0.2)
        a.close()
        b = agent.connect()
        b.send(b'{"execute":"guest-ping","id":"fresh"}')
        got = b.read_for(1.0)
        assert (got == b'{"return": {}, "id": "fresh"}\n') is answered, (kind, got)


def test_client_vanishing_with_unread_output(start_agent):
    agent = start_agent("qga")
    for _ in range(3):
        a = agent.connect()
        a.send(b'{"execute":"guest-info"}' * 3000)       # ~10 MB of answers, never read
        time.sleep(0.3)
        a.sock.close()
    b = agent.connect()
    assert b.exchange(b"") == (b'{"error": {"class": "GenericError", '
                               b'"desc": "JSON parse error, stray \'\\uFFFD\'"}}\n')
    assert agent.proc.poll() is None


# ---------------------------------------------------------------- hostile input

def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


@pytest.mark.slow
def test_deep_nesting_sent_without_reading_still_resyncs(start_agent):
    """200,000 levels of '[' and ']' written by a host that reads nothing meanwhile."""
    agent = start_agent("qga")
    client = agent.connect(timeout=60)
    request, answer = sync_marker(42)
    client.send(b"[" * 200_000 + b"]" * 200_000 + request)   # would deadlock a blocking agent
    got = client.read_until(answer, timeout=60)
    assert got.endswith(answer)
    assert client.call(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'


@pytest.mark.slow
def test_64_mib_line_and_invalid_utf8_then_resync(start_agent):
    agent = start_agent("qga")
    client = agent.connect(timeout=60)
    client.send(b'{"execute":"guest-ping","arguments":{"pad":"' + b"\xc3(" * (33 << 20) + b'"}}')
    request, answer = sync_marker(7)
    client.send(request)
    got = client.read_until(answer, timeout=60)
    assert b"JSON token size limit exceeded" in got
    assert rss_mib(agent.proc.pid) < 400
    client.send(b'{"execute":"guest-sync-delimited","arguments":{"id":1}}')
    assert client.read_until(b"\n") == b'\xff{"return": 1}\n'


def test_truncated_request_then_resync(start_agent):
    agent = start_agent("qga")
    client = agent.connect()
    client.send(b'{"execute": "guest-sync", "arguments": {"id": 12')
    assert client.read_for(0.3) == b""
    request, answer = sync_marker(3)
    client.send(request)
    assert client.read_until(answer).endswith(answer)
