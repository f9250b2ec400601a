"""Ask the real qemu-ga and our handlers the same questions about a fake /sys.

Run by the tests inside a private mount namespace
(``unshare -m --propagation private python ns_probe.py ...``), never on its
own: it mounts tmpfs over /sys and /run *in that namespace only*, copies
the fake tree there, optionally loop-mounts an image (and points its
/sys/dev/block entry at a fake device) or bind-mounts a directory, then
starts qemu-ga on a unix socket and prints, as JSON, both agents' answers
to every command named on the command line.

    ns_probe.py OUTER_NS TREE QEMU_GA WORKDIR [--loop IMAGE=DEVDIR] [--bind SRC=DST]
                [--net OUTER_NET_NS] [--fake-program PATH=SCRIPT] [--allow NAME]
                [--watch PATH] [--agent-path PATH] REQUEST...

A REQUEST is a command name or a whole JSON request. Both agents run with
the machine-changing commands blocked except those named by ``--allow``;
a ``--watch``ed path is put back as it was before each agent's session and
its state (mode, owner, content) recorded after every request; a request
that gets no reply (guest-shutdown...) shows as null. ``--fake-program``
bind-mounts a script over a system program (only in the namespace) and
checks it took effect before anything runs.

OUTER_NS is the caller's ``readlink /proc/self/ns/mnt``: the probe refuses
to touch anything unless it runs in a different mount namespace. ``--net``
(with the caller's network namespace, which must differ too) gives the
namespace a loopback, a veth pair with addresses, an alias label, a
bridge and a tap device, for guest-network-get-interfaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qga_helpers import DANGEROUS, AgentClient, agent_call, make_ctx  # noqa: E402

from agent.platform import Platform  # noqa: E402
from agent.registry import COMMANDS  # noqa: E402


NET_SETUP = (
    "link set lo up",
    "link add v0 type veth peer name v1",
    "link set v0 address 02:00:00:00:00:0a",  # links stay down: no traffic, stable counters
    "link set v1 address 02:00:00:00:00:0b",
    "addr add 192.0.2.10/24 dev v0",
    "addr add 198.51.100.7/16 dev v0 label v0:alias",
    "-6 addr add fd00::10/64 dev v0 nodad",
    "-6 addr add fd00:1::10/48 dev v1 nodad",
    "link add br0 type bridge",
    "tuntap add dev tap0 mode tap",
    "tuntap add dev tun0 mode tun",
    "addr add 203.0.113.1/32 dev tun0",
)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main(argv: list[str]) -> int:
    outer_ns, tree, qemu_ga, workdir, *rest = argv
    # refuse to run where it would change the machine's own /sys
    if os.readlink("/proc/self/ns/mnt") == outer_ns:
        print("ns_probe.py must run in its own mount namespace", file=sys.stderr)
        return 2
    mount("-t", "tmpfs", "fake-sys", "/sys")
    shutil.copytree(os.path.join(tree, "sys"), "/sys", symlinks=True, dirs_exist_ok=True)
    mount("-t", "tmpfs", "fake-run", "/run")
    if os.path.isdir(os.path.join(tree, "run")):
        shutil.copytree(os.path.join(tree, "run"), "/run", symlinks=True, dirs_exist_ok=True)
    commands: list[dict] = []
    fakes: set[str] = set()
    agent_path = os.environ.get("PATH", "")
    allowed: set[str] = set()
    watched: list[str] = []
    while rest:
        item = rest.pop(0)
        if item == "--loop":
            image, devdir = rest.pop(0).split("=", 1)
            target = os.path.join(workdir, "loop-mnt")
            os.makedirs(target, exist_ok=True)
            mount("-o", "loop", image, target)
            st = os.stat(target)
            link = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.relpath(devdir, os.path.dirname(link)), link)
        elif item == "--net":
            if os.readlink("/proc/self/ns/net") == rest.pop(0):
                print("--net needs its own network namespace", file=sys.stderr)
                return 2
            for command in NET_SETUP:
                subprocess.run(["ip", *command.split()], check=True)
        elif item == "--bind":
            src, dst = rest.pop(0).split("=", 1)
            if not os.path.exists(dst):
                os.makedirs(dst)
            mount("--bind", src, dst)
        elif item == "--fake-program":
            # e.g. /sbin/shutdown: the bind mount must demonstrably be in place
            # before any agent may run the program
            program, script = rest.pop(0).split("=", 1)
            mount("--bind", script, program)
            with open(program, "rb") as fake, open(script, "rb") as wanted:
                if fake.read() != wanted.read():
                    print(f"{program} is not the fake", file=sys.stderr)
                    return 2
            fakes.add(program)
        elif item == "--agent-path":
            agent_path = rest.pop(0)
        elif item == "--allow":
            allowed.add(rest.pop(0))
        elif item == "--watch":
            watched.append(rest.pop(0))
        else:
            commands.append(json.loads(item) if item.startswith("{") else {"execute": item})
    os.environ["PATH"] = agent_path  # from here on, what both agents search
    problem = unsafe(allowed, fakes, commands, workdir)
    if problem:
        print(f"refusing to run: {problem}", file=sys.stderr)
        return 2
    blocked = [name for name in DANGEROUS if name not in allowed]
    snapshot = Snapshot(watched, workdir)
    theirs = run_session(lambda: QemuGa(qemu_ga, workdir, blocked), commands, snapshot)
    ours = run_session(lambda: Ours(workdir, blocked), commands, snapshot)
    json.dump({"theirs": theirs, "ours": ours}, sys.stdout)
    return 0


def unsafe(allowed: set[str], fakes: set[str], commands: list[dict], workdir: str) -> str | None:
    """Why letting the agents run the ``allowed`` commands could touch the
    machine, or None. In this namespace /sys is a tmpfs, so the sysfs writers
    are harmless; the others need fakes."""
    from agent.platform import Platform

    def only_fakes_in_path(*programs):
        for name in programs:
            found = Platform().find_program(name)
            if found is not None and not os.path.realpath(found).startswith(workdir):
                return f"{name} in PATH is the real {found}"
        return None

    for name in allowed:
        if name == "guest-shutdown" and "/sbin/shutdown" not in fakes:
            return "guest-shutdown without a fake /sbin/shutdown"
        if name == "guest-set-time":
            if "/sbin/hwclock" not in fakes:
                return "guest-set-time without a fake /sbin/hwclock"
            if any(c["execute"] == name and not refused_time(c.get("arguments", {}))
                   for c in commands):
                return "guest-set-time with a valid time would set the real clock"
        if name.startswith("guest-suspend-"):
            why = only_fakes_in_path("systemctl", "pm-is-supported", "pm-suspend",
                                     "pm-hibernate", "pm-suspend-hybrid")
            if why:
                return why
        if name == "guest-set-user-password":
            why = only_fakes_in_path("chpasswd")
            if why:
                return why
        if name in ("guest-fstrim", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"):
            return f"{name} would act on the machine's own filesystems"
    return None


def refused_time(arguments: dict) -> bool:
    """No time (the RTC is read: the fake hwclock), or one more than a year
    outside the 1970..2069 range both agents refuse before touching the clock."""
    if "time" not in arguments:
        return True
    year_ns = 366 * 86400 * 10**9
    return arguments["time"] < -year_ns or arguments["time"] > 101 * year_ns


class QemuGa:
    def __init__(self, qemu_ga: str, workdir: str, blocked: list[str]) -> None:
        sock = os.path.join(workdir, "ns.sock")
        env = dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0")  # libudev on a tmpfs /sys
        self.proc = subprocess.Popen([qemu_ga, "-m", "unix-listen", "-p", sock, "-t", workdir,
                                      "-b", ",".join(blocked)],
                                     env=env, stderr=subprocess.DEVNULL)
        try:
            self.client = AgentClient(sock)
        except OSError:
            self.proc.kill()
            self.proc.wait()
            raise
        self.marker = 0

    def request(self, message: dict) -> dict | None:
        self.marker += 1
        return self.client.request_maybe_silent(message, self.marker)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # qemu-ga 7.2 now and then deadlocks in its SIGTERM handler
            self.proc.kill()
            self.proc.wait()


class Ours:
    def __init__(self, workdir: str, blocked: list[str]) -> None:
        self.ctx = make_ctx(Platform(), workdir)
        self.blocked = blocked

    def request(self, message: dict) -> dict | None:
        name = message["execute"]
        if name in self.blocked:
            return {"error": {"class": "CommandNotFound",
                              "desc": f"Command {name} has been disabled"}}
        reply = agent_call(self.ctx, name, **message.get("arguments", {}))
        if "return" in reply and not COMMANDS[name].success_response:
            return None
        return reply

    def close(self) -> None:
        pass


class Snapshot:
    """The watched paths as they were before any agent ran, to put back."""

    def __init__(self, paths: list[str], workdir: str) -> None:
        self.paths = paths
        self.saved = {}
        for i, path in enumerate(paths):
            if os.path.isdir(path) and not os.path.islink(path):
                backup = os.path.join(workdir, f"snapshot-{i}")
                shutil.copytree(path, backup, symlinks=True)
                self.saved[path] = ("dir", backup)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    self.saved[path] = ("file", f.read())

    def restore(self) -> None:
        for path in self.paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path) and self.saved.get(path, ("",))[0] != "file":
                os.unlink(path)
            kind, data = self.saved.get(path, (None, None))
            if kind == "dir":
                shutil.copytree(data, path, symlinks=True)
            elif kind == "file":
                with open(path, "r+b" if os.path.exists(path) else "wb") as f:
                    f.truncate(0)
                    f.write(data)


def run_session(start, commands: list[dict], snapshot: Snapshot) -> list:
    """Every reply (with, when paths are watched, their state after it), the
    watched paths put back first, so both agents start from the same files."""
    snapshot.restore()
    agent = start()
    try:
        results = []
        for message in commands:
            reply = agent.request(message)
            results.append([reply, [file_state(p) for p in snapshot.paths]]
                           if snapshot.paths else reply)
        return results
    finally:
        agent.close()


def file_state(path: str):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    content = None
    if os.path.isfile(path):
        with open(path, "rb") as f:
            content = f.read().decode("utf-8", "replace")
    return {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "content": content}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
