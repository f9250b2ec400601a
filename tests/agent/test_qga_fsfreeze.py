"""fsfreeze: the sequence, order and errors with a recording platform; then
for real, on ext4 filesystems on loop devices created here (root only),
against qemu-ga.

The real tests only ever use guest-fsfreeze-freeze-list naming their own
loop mounts (guest-fsfreeze-freeze stays blocked), and every mount is
thawed and unmounted in a finally.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent import hookproc
from agent.commands import fsfreeze, load_all
from agent.config import Config
from agent.context import Context
from agent.dispatcher import Dispatcher
from agent.errors import AgentError
from agent.platform import HookRun, Mount, Platform
from agent.protocol import Protocol
from agent.timers import Scheduler

from qga_harness import DANGEROUS, QGA, spawn_agent

load_all()


class FakeFS(Platform):
    """Mounts and FIFREEZE/FITHAW as data; every call recorded."""

    def __init__(self, mounts, freeze_errors=None, hook_status=0):
        super().__init__()
        self.mounts = [Mount(d, "ext4", 8, i) for i, d in enumerate(mounts)]
        self.freeze_errors = freeze_errors or {}
        self.frozen: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.hook_status = hook_status
        self.fds: dict[int, str] = {}

    def mount_list(self):
        return list(self.mounts)

    def open_mountpoint(self, dirname):
        if dirname in self.freeze_errors and self.freeze_errors[dirname] == "open":
            raise OSError(errno.ENOENT, "No such file or directory")
        fd = 100 + len(self.fds)
        self.fds[fd] = dirname
        return fd

    def fifreeze(self, fd):
        path = self.fds[fd]
        self.calls.append(("freeze", path))
        err = self.freeze_errors.get(path)
        if isinstance(err, int):
            raise OSError(err, os.strerror(err))
        if self.frozen.get(path):
            raise OSError(errno.EBUSY, "Device or resource busy")  # a second mount of it
        self.frozen[path] = self.frozen.get(path, 0) + 1

    def fithaw(self, fd):
        path = self.fds[fd]
        self.calls.append(("thaw", path))
        if not self.frozen.get(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.frozen[path] -= 1

    def close_fd(self, fd):
        self.fds.pop(fd)

    def run_hook(self, path, arg, *, timeout=None, capture=False):
        self.calls.append(("hook", arg))
        return HookRun(self.hook_status, b"line one\nline two\n", False)


def make(platform, hook=None, tmp_path=None, **config):
    cfg = Config(fsfreeze_hook=hook, **config)
    ctx = Context(platform, config=cfg, statedir=str(tmp_path or "/nonexistent"),
                  timers=Scheduler())
    dispatcher = Dispatcher(ctx, blocked=[])
    return ctx, dispatcher


def call(dispatcher, request: bytes) -> bytes:
    (event,) = Protocol().feed(request)
    return dispatcher.handle(event)


def test_freeze_reverse_order_and_thaw_forward_order():
    fs = FakeFS(["/", "/boot", "/data"])
    ctx, d = make(fs)
    assert call(d, b'{"execute":"guest-fsfreeze-freeze"}') == b'{"return": 3}\n'
    assert [c for c in fs.calls if c[0] == "freeze"] == [("freeze", "/data"), ("freeze", "/boot"),
                                                          ("freeze", "/")]
    assert ctx.frozen
    assert b"frozen state" in call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    fs.calls.clear()
    assert call(d, b'{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 3}\n'
    # each filesystem is thawed until FITHAW fails, in mount order
    assert fs.calls == [("thaw", "/"), ("thaw", "/"), ("thaw", "/boot"), ("thaw", "/boot"),
                        ("thaw", "/data"), ("thaw", "/data")]
    assert not ctx.frozen


def test_freeze_list_matches_mount_points_exactly():
    fs = FakeFS(["/", "/data", "/data2", "/data"])
    ctx, d = make(fs)
    out = call(d, b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/data","/data/","/x"]}}')
    assert out == b'{"return": 1}\n'                 # the second /data mount: EBUSY-like
    assert [c[1] for c in fs.calls if c[0] == "freeze"] == ["/data", "/data"]
    call(d, b'{"execute":"guest-fsfreeze-thaw"}')


def test_skipped_errors_are_not_counted():
    fs = FakeFS(["/a", "/b", "/c"], {"/a": errno.EOPNOTSUPP, "/b": errno.EBUSY})
    _, d = make(fs)
    assert call(d, b'{"execute":"guest-fsfreeze-freeze"}') == b'{"return": 1}\n'


@pytest.mark.parametrize("error, desc", [
    (errno.EIO, "failed to freeze /b: Input/output error"),
    ("open", "failed to open /b: No such file or directory"),
])
def test_a_failure_thaws_everything_and_reports(error, desc):
    fs = FakeFS(["/a", "/b", "/c"], {"/b": error})
    ctx, d = make(fs, hook="/bin/true")
    out = call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    assert out == Protocol.encode({"error": {"class": "GenericError", "desc": desc}})
    assert not ctx.frozen and not any(fs.frozen.values())
    assert ("hook", "thaw") in fs.calls


def test_nothing_frozen_leaves_the_frozen_state_and_runs_the_thaw_hook():
    fs = FakeFS(["/a"])
    ctx, d = make(fs, hook="/bin/true")
    assert call(d, b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[]}}') == \
        b'{"return": 0}\n'
    assert not ctx.frozen
    assert fs.calls == [("hook", "freeze"), ("hook", "thaw")]


def test_hook_failure_stops_the_freeze():
    fs = FakeFS(["/a"], hook_status=3)
    ctx, d = make(fs, hook="/bin/true")
    assert b"fsfreeze hook has failed with status 3" in call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    assert not ctx.frozen and not fs.frozen


def test_hook_must_be_executable(tmp_path):
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    fs = FakeFS(["/a"])
    _, d = make(fs, hook=str(hook))
    assert f"can't access fsfreeze hook '{hook}': Permission denied".encode() in \
        call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    hook.unlink()
    assert b"No such file or directory" in call(d, b'{"execute":"guest-fsfreeze-thaw"}')


def test_watchdog_thaws_and_logs(caplog):
    now = [0.0]
    fs = FakeFS(["/a"])
    cfg = Config(watchdog=5)
    ctx = Context(fs, config=cfg, timers=Scheduler(clock=lambda: now[0]))
    d = Dispatcher(ctx)
    assert call(d, b'{"execute":"guest-fsfreeze-freeze"}') == b'{"return": 1}\n'
    now[0] = 4.9
    ctx.timers.run_due()
    assert ctx.frozen
    now[0] = 5.0
    with caplog.at_level("CRITICAL", logger="qga"):
        ctx.timers.run_due()
    assert not ctx.frozen and not fs.frozen["/a"]
    assert "fsfreeze watchdog" in caplog.text and "thawed 1 filesystem" in caplog.text


def test_thaw_cancels_the_watchdog():
    now = [0.0]
    fs = FakeFS(["/a"])
    ctx = Context(fs, config=Config(watchdog=5), timers=Scheduler(clock=lambda: now[0]))
    d = Dispatcher(ctx)
    call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    call(d, b'{"execute":"guest-fsfreeze-thaw"}')
    call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    now[0] = 6.0
    ctx.timers.run_due()
    assert not ctx.frozen, "the second freeze has its own watchdog"
    assert ctx.timers.timeout(None) is None


def test_hook_output_is_logged_when_asked(caplog):
    fs = FakeFS(["/a"])
    _, d = make(fs, hook="/bin/true", hook_log=True)
    with caplog.at_level("DEBUG", logger="qga.hook"):
        call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    assert "fsfreeze hook freeze: line one" in caplog.text


def test_real_hook_timeout_kills_the_hook(tmp_path):
    hook = tmp_path / "slow-hook"
    hook.write_text("#!/bin/sh\necho starting\nsleep 30\n")
    hook.chmod(0o755)
    started = time.monotonic()
    result = Platform().run_hook(str(hook), "freeze", timeout=0.5, capture=True)
    assert time.monotonic() - started < 5
    assert result.timed_out and b"starting" in result.output


def test_real_hook_gets_its_argument_and_dev_null(tmp_path):
    hook = tmp_path / "hook"
    hook.write_text('#!/bin/sh\necho "$1 $(readlink /proc/self/fd/0)"\nexit 4\n')
    hook.chmod(0o755)
    result = Platform().run_hook(str(hook), "thaw", capture=True)
    assert result == HookRun(4, b"thaw /dev/null\n", False)



def lock_holder_hook(tmp_path, name="hook"):
    """A hook in the "database flush lock holder" pattern: it starts a
    background child that keeps its stdout, says ok and exits 0 at once.
    The child records its pid, prints once more a second later (it must not
    die of SIGPIPE) and notes that it is still alive."""
    hook = tmp_path / name
    hook.write_text(f'#!/bin/sh\n( sleep 1; echo late; echo "still alive" >> {tmp_path}/holder.alive;'
                    f' sleep 9 ) &\necho $! >> {tmp_path}/holder.pid\necho "ok $1"\nexit 0\n')
    hook.chmod(0o755)
    return hook


def kill_holders(tmp_path) -> None:
    for line in (tmp_path / "holder.pid").read_text().split() if (tmp_path / "holder.pid").exists() else ():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(int(line)), signal.SIGKILL)


@pytest.fixture(params=["pidfd", "no-pidfd"])
def wait_kind(request, monkeypatch):
    """The hook is waited for by a pidfd, or by polling where the kernel has none (< 5.3)."""
    if request.param == "no-pidfd":
        def no_pidfd(pid, flags=0):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        monkeypatch.setattr(hookproc.os, "pidfd_open", no_pidfd, raising=False)
    return request.param


@pytest.mark.timeout(30)
@pytest.mark.parametrize("capture", [False, True], ids=["no-log", "hook-log"])
@pytest.mark.parametrize("timeout", [None, 5.0], ids=["no-timeout", "timeout"])
def test_hook_background_child_does_not_hold_the_agent(tmp_path, capture, timeout, wait_kind):
    hook = lock_holder_hook(tmp_path)
    try:
        started = time.monotonic()
        result = Platform().run_hook(str(hook), "freeze", timeout=timeout, capture=capture)
        elapsed = time.monotonic() - started
        assert result == HookRun(0, b"ok freeze\n" if capture else b"", False)
        assert elapsed < 0.8, f"waited {elapsed:.2f}s for the hook's background child"
        holder = int((tmp_path / "holder.pid").read_text())
        os.kill(holder, 0)                          # the lock holder was not killed
        deadline = time.monotonic() + 5
        while not (tmp_path / "holder.alive").exists():
            assert time.monotonic() < deadline, "the lock holder died writing to its stdout"
            time.sleep(0.05)
    finally:
        kill_holders(tmp_path)


@pytest.mark.timeout(30)
def test_hook_timeout_counts_the_hook_not_its_background_child(tmp_path, wait_kind):
    hook = lock_holder_hook(tmp_path)
    try:
        result = Platform().run_hook(str(hook), "freeze", timeout=0.5, capture=True)
        assert result == HookRun(0, b"ok freeze\n", False)
        time.sleep(0.7)                             # past the timeout: nothing is killed later
        os.kill(int((tmp_path / "holder.pid").read_text()), 0)
    finally:
        kill_holders(tmp_path)


@pytest.mark.timeout(30)
def test_hook_timeout_holds_for_a_hook_that_never_stops_printing(tmp_path, wait_kind):
    # output arriving all the time must not keep the deadline from being seen
    hook = tmp_path / "chatty"
    hook.write_text("#!/bin/sh\nexec yes spam\n")
    hook.chmod(0o755)
    started = time.monotonic()
    result = Platform().run_hook(str(hook), "freeze", timeout=0.5, capture=True)
    assert time.monotonic() - started < 1.5
    assert result.timed_out and result.output.startswith(b"spam\n")
    assert len(result.output) <= hookproc.OUTPUT_LIMIT


@pytest.mark.timeout(30)
def test_hook_timeout_kills_a_hung_hook_and_its_session(tmp_path, wait_kind):
    hook = tmp_path / "hung"
    hook.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {tmp_path}/child.pid\necho hanging\nsleep 30\n")
    hook.chmod(0o755)
    started = time.monotonic()
    result = Platform().run_hook(str(hook), "freeze", timeout=0.5, capture=True)
    assert time.monotonic() - started < 3
    assert result.timed_out and result.status == -signal.SIGTERM
    assert result.output == b"hanging\n"
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the hung hook's child survived the timeout"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_hook_output_larger_than_a_pipe_is_read_while_it_runs(tmp_path):
    hook = tmp_path / "chatty"
    hook.write_text("#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' a\necho\nexit 3\n")
    hook.chmod(0o755)
    result = Platform().run_hook(str(hook), "thaw", timeout=10, capture=True)
    assert result == HookRun(3, b"a" * 300000 + b"\n", False)


@pytest.mark.timeout(30)
def test_hook_output_past_the_limit_is_read_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hookproc, "OUTPUT_LIMIT", 1000)
    hook = tmp_path / "chatty"
    hook.write_text("#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' a\necho\n")
    hook.chmod(0o755)
    assert Platform().run_hook(str(hook), "freeze", capture=True) == \
        HookRun(0, b"a" * 1000, False, 299001)
    fs = FakeFS(["/a"])
    fs.run_hook = lambda *a, **k: HookRun(0, b"first\n", False, 42)
    _, d = make(fs, hook="/bin/true", hook_log=True)
    with caplog.at_level("DEBUG", logger="qga.hook"):
        call(d, b'{"execute":"guest-fsfreeze-freeze"}')
    assert "fsfreeze hook freeze: 42 more bytes of output not logged" in caplog.text


# ---------------------------------------------------------------- real filesystems

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878


def fs_is_frozen(mountpoint: str) -> bool:
    """FIFREEZE answers EBUSY on a frozen filesystem; else undo our own freeze."""
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return True
            raise
        fcntl.ioctl(fd, FITHAW, 0)
        return False
    finally:
        os.close(fd)


def force_thaw(mountpoint: str) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY)
    except OSError:
        return
    try:
        for _ in range(16):
            fcntl.ioctl(fd, FITHAW, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.fixture
def loop_mounts(tmp_path):
    """Two fresh ext4 filesystems on loop devices, mounted under tmp_path."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop device support (/dev/loop-control)")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (Debian package e2fsprogs)")
    mounts = []
    try:
        for name in ("m1", "m2"):
            image = tmp_path / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
            point = tmp_path / name
            point.mkdir()
            subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True,
                           capture_output=True)
            mounts.append(str(point))
        yield mounts
    finally:
        for point in reversed(mounts):
            force_thaw(point)
            subprocess.run(["umount", point], capture_output=True)


FREEZE_ALLOWED = tuple(n for n in DANGEROUS if n != "guest-fsfreeze-freeze-list")


def freeze_list(points) -> bytes:
    body = ",".join(f'"{p}"' for p in points)
    return b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[%s]}}' % body.encode()


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(120)
def test_real_freeze_thaw_matches_qemu_ga(qemu_ga, loop_mounts, tmp_path):
    m1, m2 = loop_mounts
    transcripts = {}
    for name, command in (("qemu-ga", [qemu_ga]), ("qga", QGA)):
        work = tmp_path / name
        hook = work / "hook.sh"
        work.mkdir()
        hook.write_text(f'#!/bin/sh\necho "$1" >> {work}/hook.log\n')
        hook.chmod(0o755)
        agent = spawn_agent(command, work, name, ["-F" + str(hook)],
                            block=(*FREEZE_ALLOWED, "guest-get-osinfo"))
        seen = []
        try:
            client = agent.connect()
            seen.append(client.call(freeze_list([m1, m2, str(tmp_path / "not-a-mount")])))
            seen.append([fs_is_frozen(m1), fs_is_frozen(m2)])
            seen.append((agent.statedir / "qga.state.isfrozen").exists())
            for request in (b'{"execute":"guest-fsfreeze-status"}', b'{"execute":"guest-get-host-name"}',
                            b'{"execute":"guest-get-osinfo"}', b'{"execute":"guest-info"}',
                            b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[]}}'):
                seen.append(client.call(request))
            seen.append(client.call(b'{"execute":"guest-fsfreeze-thaw"}'))
            seen.append([fs_is_frozen(m1), fs_is_frozen(m2)])
            for request in (b'{"execute":"guest-fsfreeze-status"}', b'{"execute":"guest-get-osinfo"}',
                            b'{"execute":"guest-fsfreeze-thaw"}', freeze_list([m2]),
                            b'{"execute":"guest-fsfreeze-thaw"}'):
                seen.append(client.call(request))
            seen.append((work / "hook.log").read_text())
        finally:
            force_thaw(m1)
            force_thaw(m2)
            agent.stop()
        transcripts[name] = seen
    assert transcripts["qga"] == transcripts["qemu-ga"]
    assert transcripts["qga"][0] == b'{"return": 2}\n' and transcripts["qga"][1] == [True, True]


@pytest.mark.root
@pytest.mark.timeout(120)
def test_restarted_agent_can_still_thaw(loop_mounts, tmp_path):
    m1, _ = loop_mounts
    state = tmp_path / "state"
    state.mkdir()
    first = spawn_agent(QGA, tmp_path / "first", "qga", block=FREEZE_ALLOWED, statedir=state)
    try:
        client = first.connect()
        assert client.call(freeze_list([m1])) == b'{"return": 1}\n'
        first.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert first.proc.poll() is None, "SIGTERM is ignored while frozen"
        first.proc.kill()
        first.proc.wait()
        second = spawn_agent(QGA, tmp_path / "second", "qga", block=FREEZE_ALLOWED, statedir=state)
        try:
            again = second.connect()
            assert again.call(b'{"execute":"guest-fsfreeze-status"}') == b'{"return": "frozen"}\n'
            assert fs_is_frozen(m1)
            assert again.call(b'{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 1}\n'
            assert not fs_is_frozen(m1)
            assert not (state / "qga.state.isfrozen").exists()
        finally:
            second.stop()
    finally:
        force_thaw(m1)
        first.stop()


@pytest.mark.root
@pytest.mark.timeout(120)
def test_watchdog_thaws_a_forgotten_freeze(loop_mounts, tmp_path):
    m1, _ = loop_mounts
    log = tmp_path / "agent.log"
    agent = spawn_agent(QGA, tmp_path / "w", "qga", ["--fsfreeze-watchdog=1", "-l", str(log)],
                        block=FREEZE_ALLOWED)
    try:
        client = agent.connect()
        assert client.call(freeze_list([m1])) == b'{"return": 1}\n'
        assert fs_is_frozen(m1)
        deadline = time.monotonic() + 10
        while fs_is_frozen(m1):
            assert time.monotonic() < deadline, "the watchdog did not thaw"
            time.sleep(0.1)
        assert client.call(b'{"execute":"guest-fsfreeze-status"}') == b'{"return": "thawed"}\n'
        assert "critical: fsfreeze watchdog" in log.read_text()
    finally:
        force_thaw(m1)
        agent.stop()


@pytest.mark.root
@pytest.mark.timeout(120)
def test_hung_hook_is_killed_with_a_timeout(loop_mounts, tmp_path):
    m1, _ = loop_mounts
    hook = tmp_path / "hung.sh"
    hook.write_text("#!/bin/sh\necho about to hang\nsleep 60\n")
    hook.chmod(0o755)
    log = tmp_path / "agent.log"
    agent = spawn_agent(QGA, tmp_path / "h", "qga",
                        ["-F" + str(hook), "--fsfreeze-hook-timeout=1", "--fsfreeze-hook-log",
                         "-l", str(log)], block=FREEZE_ALLOWED)
    try:
        client = agent.connect()
        started = time.monotonic()
        out = client.call(freeze_list([m1]), timeout=30)
        assert time.monotonic() - started < 10
        assert out == Protocol.encode({"error": {"class": "GenericError",
                                                 "desc": "fsfreeze hook has timed out after 1 seconds"}})
        assert not fs_is_frozen(m1)
        assert client.call(b'{"execute":"guest-fsfreeze-status"}') == b'{"return": "thawed"}\n'
        assert "fsfreeze hook freeze: about to hang" in log.read_text()
    finally:
        force_thaw(m1)
        agent.stop()


@pytest.mark.root
@pytest.mark.timeout(120)
def test_nothing_is_logged_while_frozen(loop_mounts, tmp_path):
    m1, _ = loop_mounts
    log = tmp_path / "verbose.log"
    agent = spawn_agent(QGA, tmp_path / "v", "qga", ["-v", "-l", str(log)], block=FREEZE_ALLOWED)
    try:
        client = agent.connect()
        assert client.call(freeze_list([m1])) == b'{"return": 1}\n'
        size = log.stat().st_size
        for request in (b'{"execute":"guest-ping"}', b'{"execute":"guest-info"}',
                        b'{"execute":"guest-get-osinfo"}', b"garbage\n"):
            client.call(request)
        assert log.stat().st_size == size, "the log was written while frozen"
        assert "disabling logging due to filesystem freeze" in log.read_text()
        assert client.call(b'{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 1}\n'
        assert "warning: logging re-enabled due to filesystem unfreeze" in log.read_text()
    finally:
        force_thaw(m1)
        agent.stop()


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(120)
def test_lock_holder_hook_does_not_stall_freeze_or_thaw(qemu_ga, loop_mounts, tmp_path):
    """A hook leaving a background child that holds its output: qemu-ga
    answers at once (it waits for the hook's pid, output on /dev/null);
    qga too, in every mode, and keeps the child alive."""
    m1, _ = loop_mounts
    hook = lock_holder_hook(tmp_path)
    log = tmp_path / "hook-log.log"
    modes = {"qemu-ga": ([qemu_ga], []),
             "qga": (QGA, []),
             "qga-timeout": (QGA, ["--fsfreeze-hook-timeout=5"]),
             "qga-log": (QGA, ["--fsfreeze-hook-log", "-l", str(log)]),
             "qga-log-timeout": (QGA, ["--fsfreeze-hook-log", "--fsfreeze-hook-timeout=5",
                                       "-l", str(log)])}
    try:
        for name, (command, extra) in modes.items():
            agent = spawn_agent(command, tmp_path / name, name, ["-F" + str(hook), *extra],
                                block=FREEZE_ALLOWED)
            try:
                client = agent.connect()
                for request, answer in ((freeze_list([m1]), b'{"return": 1}\n'),
                                        (b'{"execute":"guest-ping"}', b'{"return": {}}\n'),
                                        (b'{"execute":"guest-fsfreeze-thaw"}', b'{"return": 1}\n')):
                    started = time.monotonic()
                    assert client.call(request, timeout=30) == answer, name
                    assert time.monotonic() - started < 0.8, f"{name}: {request!r} waited"
                assert not fs_is_frozen(m1)
            finally:
                force_thaw(m1)
                agent.stop()
        holders = [int(p) for p in (tmp_path / "holder.pid").read_text().split()]
        assert len(holders) == 2 * len(modes)       # a freeze and a thaw hook each
        for pid in holders:
            os.kill(pid, 0)                         # no agent killed a lock holder
        text = log.read_text()
        assert text.count("fsfreeze hook freeze: ok freeze") == 2
        assert text.count("fsfreeze hook thaw: ok thaw") == 2
    finally:
        kill_holders(tmp_path)
