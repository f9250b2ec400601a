"""The agent process: start-up, the event loop, signals, shutdown.

Start-up follows qemu-ga 7.2: check the frozen marker, install the log,
daemonize (``-d``: fork, lock the pidfile, setsid, chdir /), open the log
file, create the persistent state, apply the block list, install signal
handlers, open the channel (retrying every 5 s with ``-r``) and serve.
Deferred while frozen, as in qemu-ga: the log file and the pidfile are
opened at the first thaw.

The loop is single-threaded, like qemu-ga's: requests run one at a time in
arrival order and each response is queued before the next request is
looked at.  What qga does better:

* the protocol state is reset when a client goes away;
* output is non-blocking: a host that sends a flood of garbage without
  reading cannot deadlock the agent -- parse-error replies are dropped
  (and counted in the log) while more than ``ERROR_BACKLOG`` bytes wait to
  be sent, and input is read again once the host has caught up;
* a virtio port with no host attached is polled every 100 ms without
  spinning; a read error ends the agent with status 1 (so systemd
  restarts it) unless ``-r`` retries in-process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any

from agent.config import Config
from agent.context import Context
from agent.dispatcher import Dispatcher
from agent.log import AgentLogHandler, open_logfile
from agent.platform import Platform
from agent.protocol import ParseError, Protocol
from agent.state import StateDir
from agent.transports import ChannelError, Connection, open_channel

log = logging.getLogger("qga")

READ_SIZE = 256 << 10
#: stop reading input while this much output waits for the host
OUTPUT_HIGH_WATER = 16 << 20
#: parse-error replies are dropped while this much output waits
ERROR_BACKLOG = 1 << 20
HOST_ABSENT_POLL = 0.1
RETRY_INTERVAL = 5.0


class Agent:
    def __init__(self, config: Config, handler: AgentLogHandler,
                 listen_fd: int | None = None) -> None:
        self.config = config
        self.handler = handler
        self.listen_fd = listen_fd
        self.statedir = StateDir(config.statedir or "/var/run")
        self.ctx = Context(Platform(), config=config, statedir=self.statedir.path)
        self.protocol = Protocol()
        self.dispatcher: Dispatcher | None = None
        self.stopping = False
        self.pidfile_fd: int | None = None
        self.deferred_logfile: str | None = None
        self.deferred_pidfile: str | None = None
        self._wake_r = self._wake_w = -1
        self._notified = False
        self._dropped_errors = 0

    # ------------------------------------------------------------ start-up

    def initialize(self, frozen: bool) -> bool:
        """qemu-ga's initialize_agent after the frozen check; False = give up."""
        config = self.config
        self.ctx.frozen = frozen
        if config.daemonize:
            if frozen:
                become_daemon(None)
                self.deferred_pidfile = config.pidfile
            else:
                become_daemon(config.pidfile)
                self.pidfile_fd = _PIDFILE_FD
        if config.logfile:
            if frozen:
                self.deferred_logfile = config.logfile
            else:
                try:
                    self.handler.set_stream(open_logfile(config.logfile))
                except OSError as exc:
                    log.critical("unable to open specified log file: %s", os.strerror(exc.errno or 0))
                    return False
        if frozen:
            self.handler.enabled = False
        if not self.statedir.init_persistent_state(frozen):
            log.critical("failed to load persistent state")
            return False
        from agent.commands import load_all
        load_all()
        self.dispatcher = Dispatcher(self.ctx, blocked=config.blocked, listen=False)
        self.ctx.frozen_listeners.insert(0, self._frozen_changed)
        from agent.commands import fsfreeze
        fsfreeze.setup(self.ctx)
        self._install_signals()
        return True

    def _frozen_changed(self, frozen: bool) -> None:
        assert self.dispatcher is not None
        if frozen:
            self.dispatcher.frozen_changed(True)
            log.warning("disabling logging due to filesystem freeze")
            self.handler.enabled = False
            self.statedir.mark_frozen()
            return
        if self.deferred_logfile:
            try:
                self.handler.set_stream(open_logfile(self.deferred_logfile))
            except OSError:
                self.handler.set_stream(sys.stderr)
            self.deferred_logfile = None
        self.handler.enabled = True
        log.warning("logging re-enabled due to filesystem unfreeze")
        if self.deferred_pidfile:
            try:
                self.pidfile_fd = write_pidfile(self.deferred_pidfile)
            except PidfileError as exc:
                log.warning("%s", exc)
            self.deferred_pidfile = None
        self.dispatcher.frozen_changed(False)
        self.statedir.clear_frozen()

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_quit_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_quit_signal(self, signum: int, _frame: Any) -> None:
        # while frozen the agent must stay: it is the only one that can thaw
        if self.ctx.frozen:
            return
        log.debug("received signal num %d, quitting", signum)
        self.stopping = True

    # ------------------------------------------------------------ running

    def run(self) -> int:
        status = 0
        while True:
            status = self._run_once()
            if self.stopping or not self.config.retry_path:
                break
            log.warning("agent stopped unexpectedly, restarting...")
            log.warning("waiting for channel path...")
            self._sleep(RETRY_INTERVAL)
            if self.stopping:
                break
        self._shutdown()
        return 0 if self.stopping else status

    def _run_once(self) -> int:
        try:
            channel = open_channel(self.config.method or "virtio-serial",
                                   self.config.path or "", self.listen_fd)
        except ChannelError as exc:
            log.critical("%s", exc.message)
            if exc.created:
                log.critical("failed to create guest agent channel")
            log.critical("failed to initialize guest agent channel")
            return 1
        self._notify_ready()
        try:
            return self._serve(channel)
        finally:
            channel.close()
            if self.listen_fd is not None:
                self.listen_fd = None  # the activation socket is gone with the channel

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sel = selectors.DefaultSelector()
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.select(min(left, 1.0))
            sel.close()
            self._drain_wakeup()

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _serve(self, channel) -> int:
        session = _Session(self, channel)
        try:
            return session.loop()
        finally:
            session.close()

    # ------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        if self.ctx.frozen:
            # qemu-ga's cleanup: never leave filesystems frozen behind us
            thaw = self.ctx.services.get("fsfreeze-cleanup")
            if thaw is not None:
                thaw()
        if self.config.daemonize and self.config.pidfile and self.pidfile_fd is not None:
            try:
                os.unlink(self.config.pidfile)
            except OSError:
                pass
        sd_notify("STOPPING=1")

    def _notify_ready(self) -> None:
        if not self._notified:
            self._notified = True
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")


class _Session:
    """Serving one channel: the poll loop, the client, the output queue."""

    def __init__(self, agent: Agent, channel) -> None:
        self.agent = agent
        self.channel = channel
        self.poller = select.poll()
        self.roles: dict[int, str] = {}
        self._watch(agent._wake_r, "wake", _IN)
        self.client: Connection | None = None
        self.client_mask = 0
        self.out: list[memoryview] = []
        self.out_bytes = 0
        self.host_absent = False
        self.device: Connection | None = None
        self.poll_handle: int | None = None
        if channel.listening:
            self._watch(channel.fileno(), "listen", _IN)
        else:
            self._attach(channel.connection())

    def _watch(self, fd: int, role: str, mask: int) -> None:
        self.roles[fd] = role
        self.poller.register(fd, mask)

    def _unwatch(self, fd: int) -> None:
        self.roles.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        if self.client is not None and self.channel.listening:
            self.client.close()
        self.agent.ctx.timers.cancel(self.poll_handle)

    def loop(self) -> int:
        agent = self.agent
        timers = agent.ctx.timers
        roles = self.roles
        while not agent.stopping:
            timeout = timers.timeout(None)
            events = self.poller.poll(None if timeout is None else timeout * 1000)
            for fd, mask in events:
                role = roles.get(fd)
                if role == "client":
                    status = self._client_ready(mask)
                    if status is not None:
                        return status
                elif role == "wake":
                    agent._drain_wakeup()
                elif role == "listen":
                    self._accept()
            timers.run_due()
            self._update_interest()
        return 0

    # ---- clients

    def _attach(self, conn: Connection) -> None:
        self.client = conn
        self.client_mask = _IN
        self._watch(conn.fd, "client", _IN)

    def _accept(self) -> None:
        conn = self.channel.accept()
        if conn is None:
            return
        self._unwatch(self.channel.fileno())
        self._attach(conn)

    def _client_gone(self) -> None:
        """The host went away: forget its partial input (and a socket client's
        unsent output).

        A device keeps its unsent output: the guest learns of the host's
        hang-up on another virtqueue than the data, so an EOF can be seen
        after the next host's request was read and answered while the port
        was briefly closed; that answer must still go out (a stale one is
        skipped by the host's resync, as with qemu-ga).
        """
        self.agent.protocol.reset()
        if self.channel.listening or self.out_bytes > OUTPUT_HIGH_WATER:
            self.out.clear()
            self.out_bytes = 0
        self.agent.ctx.delimit_response = False
        conn, self.client = self.client, None
        if conn is not None:
            self._unwatch(conn.fd)
        if self.channel.listening:
            if conn is not None:
                conn.close()
            self._watch(self.channel.fileno(), "listen", _IN)
            return
        # a device: no host attached; look again shortly, without spinning
        self.device = conn
        self.poll_handle = self.agent.ctx.timers.call_later(HOST_ABSENT_POLL, self._resume_device)

    def _resume_device(self) -> None:
        self.poll_handle = None
        if self.device is not None:
            self._attach(self.device)

    def _client_ready(self, mask: int) -> int | None:
        conn = self.client
        if conn is None:
            return None
        if mask & select.POLLOUT:
            if not self._flush():
                return self._write_failed()
        if mask & _READABLE and self.client is conn and self.out_bytes <= OUTPUT_HIGH_WATER:
            try:
                data = conn.read(READ_SIZE)
            except OSError as exc:
                return self._read_failed(exc)
            if data is None:
                return None
            if not data:
                if not self.host_absent:
                    log.debug("received EOF")
                self.host_absent = not self.channel.listening
                self._client_gone()
                return None
            self.host_absent = False
            self._process(data)
            if self.out and not self._flush():
                return self._write_failed()
        elif mask & (select.POLLERR | select.POLLNVAL):
            self._client_gone()
        return None

    def _read_failed(self, exc: OSError) -> int | None:
        if self.channel.listening:
            log.debug("client read error: %s", os.strerror(exc.errno or 0))
            self._client_gone()
            return None
        log.critical("error reading channel: %s", os.strerror(exc.errno or 0))
        return 1

    def _write_failed(self) -> int | None:
        log.warning("error sending response: the host went away")
        self._client_gone()
        return None

    # ---- data

    def _process(self, data: bytes) -> None:
        agent = self.agent
        for event in agent.protocol.feed(data):
            if self.out_bytes > ERROR_BACKLOG and isinstance(event, ParseError):
                agent._dropped_errors += 1
                if agent._dropped_errors in (1, 1000) or agent._dropped_errors % 100000 == 0:
                    log.warning("host is not reading: %d parse-error replies dropped so far",
                                agent._dropped_errors)
                continue
            reply = agent.dispatcher.reply(event)
            if reply:
                for chunk in reply:
                    if chunk:
                        self.out.append(memoryview(chunk))
                        self.out_bytes += len(chunk)
            if self.client is None:
                return

    def _flush(self) -> bool:
        """Write what the host takes now; False when the host is gone."""
        conn = self.client
        out = self.out
        while out and conn is not None:
            chunk = out[0]
            try:
                written = conn.write(chunk)
            except OSError:
                return False
            if written == 0:
                return True
            self.out_bytes -= written
            if written == len(chunk):
                out.pop(0)
            else:
                out[0] = chunk[written:]
        return True

    def _update_interest(self) -> None:
        conn = self.client
        if conn is None:
            return
        mask = _IN if self.out_bytes <= OUTPUT_HIGH_WATER else 0
        if self.out:
            mask |= select.POLLOUT
        if mask != self.client_mask:
            self.client_mask = mask
            self.poller.modify(conn.fd, mask)


_IN = select.POLLIN | select.POLLPRI
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


# ---------------------------------------------------------------- processes

_PIDFILE_FD: int | None = None


class PidfileError(Exception):
    pass


def write_pidfile(path: str) -> int:
    """Create, lock and fill the pidfile; the returned fd holds the lock."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PidfileError(f"Cannot open pid file: {os.strerror(exc.errno or 0)}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise PidfileError(f"Cannot lock pid file: {os.strerror(exc.errno or 0)}") from None
        # the file we locked must still be the one at the path
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def become_daemon(pidfile: str | None) -> None:
    """Fork into the background: the parent exits 0 at once, as qemu-ga."""
    global _PIDFILE_FD
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    if pidfile:
        try:
            _PIDFILE_FD = write_pidfile(pidfile)
        except PidfileError as exc:
            log.critical("%s", exc)
            os._exit(1)
    os.umask(0o077)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness or stopping; no-op without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.debug("sd_notify failed: %s", exc)
