"""Commands that change the machine: never run for real against this machine.

Unit tests use a RecordingPlatform. The oracle tests run the real qemu-ga
and our handlers in a private mount namespace where what they change is
fake: /sys is a tmpfs copy (CPU, memory block and power state files),
/etc/passwd is a bind-mounted file naming a user whose home is in the test
directory, and /sbin/shutdown, /sbin/hwclock, chpasswd, systemctl and the
pm-utils are scripts that log their arguments. ns_probe.py refuses to let
either agent run such a command without its fake in place.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path

import pytest

from agent.platform import Platform
from qga_helpers import RecordingPlatform, agent_call, guest_sysfs, make_ctx, make_tree, probe


def req(name: str, **args) -> str:
    import json
    return json.dumps({"execute": name, **({"arguments": args} if args else {})})


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def both_agents(tmp_path, qemu_ga, requests, *options, tree=None, env=None):
    tree = tree or make_tree(tmp_path / "tree", {"/sys/block": None})
    answers = probe(tree, qemu_ga, tmp_path / "work", *options, *requests, env=env)
    return answers["ours"], answers["theirs"]


# -- ssh authorized keys --------------------------------------------------------------

K1, K2, K3 = "algo key1 comments", "algo key2 comments", "algo some-key another"


@pytest.fixture
def home(tmp_path):
    root = make_tree(tmp_path / "guest", {
        "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                       "alice:x:4242:4343:Alice:/home/alice:/bin/sh\n"
                       "nohome:x:4244:4244::/home/nohome:/bin/sh\n",
        "/home/alice": None})
    platform = RecordingPlatform(root=str(root))
    return platform, root / "home/alice/.ssh"


def ssh(platform, name, **args):
    return agent_call(make_ctx(platform), f"guest-ssh-{name}-authorized-keys", **args)


def test_ssh_keys_as_qemus_own_unit_test(home):
    platform, ssh_dir = home
    keys = ssh_dir / "authorized_keys"
    assert ssh(platform, "add", username="alice", keys=[K2]) == {"return": {}}
    assert keys.read_text() == K2
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert ("chown", "/home/alice/.ssh", 4242, 4343) in platform.calls
    assert ("chown", "/home/alice/.ssh/authorized_keys", 4242, 4343) in platform.calls
    ssh(platform, "add", username="alice", keys=[K1, K2])
    assert keys.read_text() == f"{K2}\n{K1}"  # no duplicate, no trailing newline
    assert ssh(platform, "get", username="alice") == {"return": {"keys": [K1, K2]}}
    ssh(platform, "add", username="alice", keys=[K2], reset=True)
    assert keys.read_text() == K2
    ssh(platform, "add", username="alice", keys=[], reset=True)
    assert keys.read_text() == ""
    keys.write_text(f"{K1}\n# a commented line\n{K3}\n{K1}\n")
    assert ssh(platform, "get", username="alice") == {"return": {"keys": [K1, K3, K1]}}
    ssh(platform, "remove", username="alice", keys=[K2])
    assert keys.read_text() == f"{K1}\n# a commented line\n{K3}\n{K1}\n"
    ssh(platform, "remove", username="alice", keys=[K1, K2])
    assert keys.read_text() == f"# a commented line\n{K3}\n"
    ssh(platform, "add", username="alice", keys=["new"])  # after the last, empty, line
    assert keys.read_text() == f"# a commented line\n{K3}\n\nnew"


def test_ssh_errors(home):
    platform, _ssh_dir = home
    assert ssh(platform, "get", username="bob")["error"]["desc"] == \
        "failed to lookup user 'bob': Success"
    assert ssh(platform, "get", username="alice")["error"]["desc"] == (
        "failed to read '/home/alice/.ssh/authorized_keys': Failed to open file "
        "\u201c/home/alice/.ssh/authorized_keys\u201d: No such file or directory")
    for bad in ("# comment", "two\nlines"):
        assert ssh(platform, "add", username="bob", keys=["ok", bad])["error"]["desc"] == \
            f"invalid OpenSSH public key: '{bad}'"
    assert ssh(platform, "remove", username="alice", keys=[K1]) == {"return": {}}
    assert ssh(platform, "add", username="nohome", keys=[K1])["error"]["desc"] == (
        "failed to create directory '/home/nohome/.ssh': No such file or directory")


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
@pytest.mark.parametrize("initial", ["none", "populated", "directory", "no-home"])
def test_ssh_keys_same_as_qemu_ga(qemu_ga, tmp_path, initial):
    work = tmp_path / "work"
    home_dir = work / "home" / "qgatest"
    home_dir.mkdir(parents=True)
    ssh_dir = home_dir / ".ssh"
    if initial == "populated":
        ssh_dir.mkdir()
        (ssh_dir / "authorized_keys").write_text(f"{K1}\n# a commented line\n{K3}\n{K1}\n")
    elif initial == "directory":
        (ssh_dir / "authorized_keys").mkdir(parents=True)
    elif initial == "no-home":
        shutil.rmtree(home_dir)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"root:x:0:0:root:/root:/bin/sh\nqgatest:x:4242:4343::{home_dir}:/bin/sh\n")
    user = {"username": "qgatest"}
    requests = [req("guest-ssh-get-authorized-keys", **user),
                req("guest-ssh-remove-authorized-keys", keys=[K2], **user),
                req("guest-ssh-add-authorized-keys", keys=[K2], **user),
                req("guest-ssh-add-authorized-keys", keys=[K1, K2], **user),
                req("guest-ssh-get-authorized-keys", **user),
                req("guest-ssh-remove-authorized-keys", keys=[K1, K2], **user),
                req("guest-ssh-add-authorized-keys", keys=["x", ""], **user),
                req("guest-ssh-add-authorized-keys", keys=[K2], reset=True, **user),
                req("guest-ssh-add-authorized-keys", keys=[], reset=True, **user),
                req("guest-ssh-get-authorized-keys", **user)]
    watch = [] if initial == "no-home" else ["--watch", str(ssh_dir),
                                             "--watch", str(ssh_dir / "authorized_keys")]
    ours, theirs = both_agents(tmp_path, qemu_ga, requests,
                               "--bind", f"{passwd}=/etc/passwd",
                               "--allow", "guest-ssh-add-authorized-keys",
                               "--allow", "guest-ssh-remove-authorized-keys", *watch)
    assert without_tmp_names(ours) == without_tmp_names(theirs)


def without_tmp_names(answers):
    """GLib's temporary file names end in six random characters."""
    import json
    import re
    text = re.sub(r"\.[A-Za-z0-9]{6}\u201d", ".XXXXXX\u201d", json.dumps(answers, ensure_ascii=False))
    return json.loads(text)


# -- passwords -------------------------------------------------------------------------


def set_password(platform, username, password: bytes, crypted=False):
    return agent_call(make_ctx(platform), "guest-set-user-password", username=username,
                      password=base64.b64encode(password).decode(), crypted=crypted)


def test_password_goes_to_chpasswd_stdin(tmp_path):
    make_tree(tmp_path, {"/usr/sbin/chpasswd": "#!/bin/sh\n"})
    (tmp_path / "usr/sbin/chpasswd").chmod(0o755)
    platform = RecordingPlatform(root=str(tmp_path), env={"PATH": "/usr/bin:/usr/sbin"})
    assert set_password(platform, "alice", b"s3cret") == {"return": {}}
    assert set_password(platform, "alice", b"$6$salt$hash", crypted=True) == {"return": {}}
    assert set_password(platform, "alice", b"cut\0here") == {"return": {}}
    assert platform.calls == [
        ("run_helper", ["/usr/sbin/chpasswd"], b"alice:s3cret\n"),
        ("run_helper", ["/usr/sbin/chpasswd", "-e"], b"alice:$6$salt$hash\n"),
        ("run_helper", ["/usr/sbin/chpasswd"], b"alice:cut\n")]
    platform.helper_status["chpasswd"] = 1
    assert set_password(platform, "alice", b"x")["error"]["desc"] == \
        "child process has failed to set user password"
    platform.helper_status["chpasswd"] = -9
    assert set_password(platform, "alice", b"x")["error"]["desc"] == \
        "child process has terminated abnormally"


def test_password_checks(tmp_path):
    platform = RecordingPlatform(root=str(tmp_path), env={"PATH": "/usr/sbin"})
    assert set_password(platform, "alice", b"two\nlines")["error"]["desc"] == \
        "forbidden characters in raw password"
    for user in ("a:b", "a\nb"):
        assert set_password(platform, user, b"x")["error"]["desc"] == \
            "forbidden characters in username"
    assert set_password(platform, "alice", b"x")["error"]["desc"] == \
        "cannot find 'passwd' program in PATH"
    assert agent_call(make_ctx(platform), "guest-set-user-password", username="a",
                      password="!", crypted=False)["error"]["desc"] == \
        "Base64 data contains invalid characters"
    assert platform.calls == []


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_password_same_as_qemu_ga(qemu_ga, tmp_path):
    work = tmp_path / "work"
    log = work / "chpasswd.log"
    script(work / "bin/chpasswd", f'echo "args:$*" >> {log}; cat >> {log}; echo >> {log}\n'
                                  'exit "${CHPASSWD_RC:-0}"\n')
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    requests = [req("guest-set-user-password", username="alice", password=b64(b"pw"),
                    crypted=False),
                req("guest-set-user-password", username="bob", password=b64(b"$6$x$y"),
                    crypted=True),
                req("guest-set-user-password", username="carol", password=b64(b"nul\0cut"),
                    crypted=False),
                req("guest-set-user-password", username="a:b", password=b64(b"x"),
                    crypted=False),
                req("guest-set-user-password", username="d", password=b64(b"x\ny"),
                    crypted=False),
                req("guest-set-user-password", username="d", password="aGk", crypted=False)]
    for rc in ("0", "1"):
        ours, theirs = both_agents(tmp_path, qemu_ga, requests,
                                   "--allow", "guest-set-user-password", "--watch", str(log),
                                   env={"PATH": str(work / "bin"), "CHPASSWD_RC": rc})
        assert ours == theirs


# -- clock -----------------------------------------------------------------------------


@pytest.fixture
def clock(tmp_path):
    make_tree(tmp_path, {"/sbin/hwclock": "#!/bin/sh\n"})
    (tmp_path / "sbin/hwclock").chmod(0o755)
    return RecordingPlatform(root=str(tmp_path))


def set_time(platform, **args):
    return agent_call(make_ctx(platform), "guest-set-time", **args)


def test_set_time_sets_the_clock_then_the_rtc(clock):
    assert set_time(clock, time=1_700_000_000_123_456_789) == {"return": {}}
    assert set_time(clock) == {"return": {}}
    assert clock.calls == [("settimeofday", 1_700_000_000, 123_456),
                           ("run_helper", ["/sbin/hwclock", "-w"], None),
                           ("run_helper", ["/sbin/hwclock", "-s"], None)]


@pytest.mark.parametrize("when", [-10**18, 4 * 10**18, 2**63 - 1])
def test_set_time_refuses_years_outside_1970_to_2069(clock, when):
    assert set_time(clock, time=when)["error"]["desc"] == "Invalid time"
    assert clock.calls == []


def test_set_time_errors(clock, tmp_path):
    clock.helper_status["hwclock"] = 1
    assert set_time(clock)["error"]["desc"] == \
        "hwclock failed to set hardware clock to system time"
    (tmp_path / "sbin/hwclock").chmod(0o644)
    assert set_time(clock, time=0)["error"]["desc"] == \
        "this feature or command is not currently supported"


def test_get_time_is_microsecond_wall_clock():
    import time
    now = agent_call(make_ctx(Platform()), "guest-get-time")["return"]
    assert now % 1000 == 0 and abs(now - time.time_ns()) < 5 * 10**9


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fake_mode", [0o755, 0o644])
def test_set_time_same_as_qemu_ga(qemu_ga, tmp_path, fake_mode):
    if not os.path.exists("/sbin/hwclock"):
        pytest.skip("no /sbin/hwclock to stand a fake in for (util-linux)")
    work = tmp_path / "work"
    log = work / "hwclock.log"
    fake = script(tmp_path / "fake-hwclock", f'echo "$*" >> {log}\nexit "${{HWCLOCK_RC:-0}}"\n')
    fake.chmod(fake_mode)
    # only times both agents refuse: a valid one would set this machine's clock
    requests = [req("guest-set-time"), req("guest-set-time", time=-10**18),
                req("guest-set-time", time=4 * 10**18)]
    for rc in ("0", "1"):
        ours, theirs = both_agents(tmp_path, qemu_ga, requests,
                                   "--fake-program", f"/sbin/hwclock={fake}",
                                   "--allow", "guest-set-time", "--watch", str(log),
                                   env={"HWCLOCK_RC": rc})
        assert ours == theirs


# -- shutdown and suspend -------------------------------------------------------------


def test_shutdown_modes(tmp_path):
    platform = RecordingPlatform()
    ctx = make_ctx(platform)
    for mode in (None, "powerdown", "halt", "reboot"):
        args = {} if mode is None else {"mode": mode}
        assert agent_call(ctx, "guest-shutdown", **args) == {"return": {}}
    flags = [call[1][2] for call in platform.calls]
    assert flags == ["-P", "-P", "-H", "-r"]
    assert platform.calls[0][1] == ["/sbin/shutdown", "-h", "-P", "+0",
                                    "hypervisor initiated shutdown"]
    assert agent_call(ctx, "guest-shutdown", mode="off")["error"]["desc"] == \
        "mode is invalid (valid values are: halt|powerdown|reboot"
    platform.helper_status["shutdown"] = 1
    assert agent_call(ctx, "guest-shutdown")["error"]["desc"] == \
        "child process has failed to shutdown"


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_shutdown_same_as_qemu_ga(qemu_ga, tmp_path):
    if not os.path.exists("/sbin/shutdown"):
        pytest.skip("no /sbin/shutdown to stand a fake in for")
    work = tmp_path / "work"
    log = work / "shutdown.log"
    fake = script(tmp_path / "fake-shutdown",
                  f'echo "$*" >> {log}\nexit "${{SHUTDOWN_RC:-0}}"\n')
    requests = [req("guest-shutdown"), req("guest-shutdown", mode="halt"),
                req("guest-shutdown", mode="reboot"), req("guest-shutdown", mode="powerdown"),
                req("guest-shutdown", mode="off")]
    for rc in ("0", "1"):
        ours, theirs = both_agents(tmp_path, qemu_ga, requests,
                                   "--fake-program", f"/sbin/shutdown={fake}",
                                   "--allow", "guest-shutdown", "--watch", str(log),
                                   env={"SHUTDOWN_RC": rc})
        assert ours == theirs
        assert (ours[0][0] is None) == (rc == "0")  # no reply on success


SUSPENDS = [req("guest-suspend-ram"), req("guest-suspend-disk"), req("guest-suspend-hybrid")]


def suspend_scenario(tmp_path, qemu_ga, helpers: dict[str, str], power_state: str):
    work = tmp_path / "work"
    log = work / "helpers.log"
    bindir = work / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, body in helpers.items():
        script(bindir / name, f'echo "{name} $*" >> {log}\n{body}\n')
    spec = guest_sysfs()
    spec["/sys/power/state"] = power_state
    tree = make_tree(tmp_path / "tree", spec)
    allow = [opt for name in ("ram", "disk", "hybrid")
             for opt in ("--allow", f"guest-suspend-{name}")]
    # /sys/power/state is the namespace's tmpfs copy: writing it suspends nothing
    return both_agents(tmp_path, qemu_ga, SUSPENDS, *allow, "--watch", str(log),
                       "--watch", "/sys/power/state", tree=tree, env={"PATH": str(bindir)})


SYSTEMD_OK = {"systemctl": '[ "$1" = status ] && exit 3; exit 0'}
SYSTEMD_FAILS = {"systemctl": '[ "$1" = status ] && exit 3; exit 1'}
NO_SYSTEMD = {"systemctl": '[ "$1" = status ] && exit 4; exit 0'}
PM_FAILS = {"pm-is-supported": "exit 0", "pm-suspend": "exit 1", "pm-hibernate": "exit 1"}
PM_REFUSES = {"pm-is-supported": "exit 1"}


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(120)
@pytest.mark.parametrize("helpers, power_state", [
    ({}, "freeze mem disk\n"),                         # only the kernel interface
    (SYSTEMD_OK, "freeze mem disk\n"),
    ({**SYSTEMD_FAILS, **PM_FAILS}, "freeze mem disk\n"),  # falls through to the kernel
    ({**NO_SYSTEMD, **PM_REFUSES}, "freeze\n"),        # nothing supports it
])
def test_suspend_same_as_qemu_ga(qemu_ga, tmp_path, helpers, power_state):
    ours, theirs = suspend_scenario(tmp_path, qemu_ga, helpers, power_state)
    assert ours == theirs


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(120)
@pytest.mark.parametrize("helpers, failure", [
    (SYSTEMD_FAILS, "the helper program 'systemctl suspend' returned an unexpected "
                    "exit status code (1)"),
    ({**NO_SYSTEMD, **PM_FAILS}, "the helper program 'pm-suspend' returned an unexpected "
                                 "exit status code (1)"),
])
def test_suspend_reports_what_qemu_ga_swallows(qemu_ga, tmp_path, helpers, failure):
    """A mechanism claims support and fails, and the kernel's does not apply:
    qemu-ga 7.2 answers nothing (as on success); we report the failure."""
    ours, theirs = suspend_scenario(tmp_path, qemu_ga, helpers, "freeze\n")
    assert theirs[0][0] is None
    assert ours[0][0] == {"error": {"class": "GenericError", "desc": failure}}
    assert ours[0][1] == theirs[0][1]  # the same helpers ran, nothing else changed
    assert ours[2] == theirs[2]        # hybrid: "unknown guest suspend mode" from both


# -- vcpus and memory blocks on a fake /sys ----------------------------------------------


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_set_vcpus_and_memory_blocks_same_as_qemu_ga(qemu_ga, tmp_path):
    tree = make_tree(tmp_path / "tree", guest_sysfs())
    cpu, mem = "/sys/devices/system/cpu", "/sys/devices/system/memory"
    requests = [
        req("guest-set-vcpus", vcpus=[{"logical-id": 2, "online": True},
                                      {"logical-id": 1, "online": False}]),
        req("guest-set-vcpus", vcpus=[{"logical-id": 0, "online": False}]),
        req("guest-set-vcpus", vcpus=[{"logical-id": 1, "online": True},
                                      {"logical-id": 7, "online": True}]),
        req("guest-set-vcpus", vcpus=[{"logical-id": 7, "online": True}]),
        req("guest-get-vcpus"),
        req("guest-set-memory-blocks", **{"mem-blks": [
            {"phys-index": 32, "online": True}, {"phys-index": 1, "online": False},
            {"phys-index": 0, "online": True}, {"phys-index": 99, "online": True}]}),
        req("guest-get-memory-blocks"),
        req("guest-set-memory-blocks", **{"mem-blks": [  # uint64 given as int64, and huge
            {"phys-index": -1, "online": True}, {"phys-index": 2**63, "online": False}]}),
    ]
    ours, theirs = both_agents(
        tmp_path, qemu_ga, requests, "--allow", "guest-set-vcpus",
        "--allow", "guest-set-memory-blocks",
        *[opt for path in (f"{cpu}/cpu1/online", f"{cpu}/cpu2/online",
                           f"{mem}/memory1/state", f"{mem}/memory32/state")
          for opt in ("--watch", path)], tree=tree)
    assert ours == theirs
    assert theirs[0][0] == {"return": 2}


# -- fstrim ------------------------------------------------------------------------------


class OnlyMounts(Platform):
    """The real platform, its mount list narrowed to filesystems a test made."""

    def __init__(self, mountpoints):
        super().__init__()
        self.mountpoints = [str(m) for m in mountpoints]

    def mount_list(self):
        return [m for m in super().mount_list() if m.dirname in self.mountpoints]


@pytest.mark.root
@pytest.mark.timeout(60)
def test_fstrim_on_a_loop_mounted_filesystem(tmp_path):
    import subprocess
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is needed")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        (mnt / "data").write_bytes(os.urandom(4 << 20))
        os.sync()
        (mnt / "data").unlink()
        ctx = make_ctx(OnlyMounts([mnt]))
        result = agent_call(ctx, "guest-fstrim")["return"]["paths"]
        assert len(result) == 1 and result[0]["path"] == str(mnt)
        if "error" in result[0]:
            assert result[0]["error"] == "trim not supported"  # a loop without discard
        else:
            assert result[0]["minimum"] >= 0 and result[0]["trimmed"] > 0
            again = agent_call(ctx, "guest-fstrim", minimum=1 << 40)["return"]["paths"][0]
            assert again == {"path": str(mnt), "error": "failed to trim: Invalid argument"}
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_fstrim_errors_per_filesystem(tmp_path):
    import errno
    from agent.platform import Mount

    class Trims(Platform):
        def mount_list(self):
            return [Mount("/a", "ext4", 8, 1), Mount("/gone", "ext4", 8, 2),
                    Mount("/iso", "iso9660", 11, 0), Mount("/b", "xfs", 8, 3)]

        def open_file(self, path, flags, mode=0o666):
            if path == "/gone":
                raise FileNotFoundError(errno.ENOENT, "gone")
            return os.open("/", os.O_RDONLY)

        def fitrim(self, fd, minimum):
            if self.current == "/iso":
                raise OSError(errno.ENOTTY, "no")
            if self.current == "/b":
                raise OSError(errno.EIO, "io")
            return max(minimum, 4096), 1 << 20

    platform = Trims()
    original = platform.open_file

    def tracking_open(path, flags, mode=0o666):
        platform.current = path
        return original(path, flags, mode)

    platform.open_file = tracking_open
    assert agent_call(make_ctx(platform), "guest-fstrim", minimum=512) == {"return": {"paths": [
        {"path": "/b", "error": "failed to trim: Input/output error"},
        {"path": "/iso", "error": "trim not supported"},
        {"path": "/gone", "error": "failed to open: No such file or directory"},
        {"path": "/a", "minimum": 4096, "trimmed": 1 << 20}]}}
