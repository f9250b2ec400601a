"""The read-only information commands: stats, network, osinfo, users, host name, timezone.

Unit tests feed the parsers literal /proc files and fake OS answers; the
oracle tests ask the real qemu-ga and our handlers the same questions, on
this machine and in namespaces with known interfaces, logins and zones.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from agent.platform import IfAddr, Platform
from qga_helpers import agent_call, make_ctx, make_tree, probe, shape


def call(platform, name, **args):
    return agent_call(make_ctx(platform), name, **args)


# -- /proc/diskstats and /proc/stat --------------------------------------------------


def test_diskstats_field_layouts(tmp_path):
    make_tree(tmp_path, {"/proc/diskstats": (
        " 254 0 vda 10 1 200 30 40 2 300 50 0 60 70\n"                        # 11 fields
        " 254 1 vda1 5 100 6 120\n"                                            # 4 (old partitions)
        "   8 0 sda 1 2 3 4 5 6 7 4294967297 9 10 11 12 13 14 15\n"           # 15, u32 wraps
        "   7 0 loop0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n"            # 17
        "   7 1 loop1 1 2 3 4 5\n"                                             # 5: no layout
        "   1 2\n")})                                                          # too short
    stats = {d["name"]: d for d in call(Platform(root=str(tmp_path)), "guest-get-diskstats")["return"]}
    assert list(stats) == ["vda", "vda1", "sda", "loop0", "loop1"]
    assert stats["vda"] == {"name": "vda", "major": 254, "minor": 0, "stats": {
        "read-ios": 10, "read-merges": 1, "read-sectors": 200, "read-ticks": 30,
        "write-ios": 40, "write-merges": 2, "write-sectors": 300, "write-ticks": 50,
        "ios-pgr": 0, "total-ticks": 60, "weight-ticks": 70}}
    assert stats["vda1"]["stats"] == {"read-ios": 5, "read-sectors": 100, "write-ios": 6,
                                      "write-sectors": 120}
    assert stats["sda"]["stats"]["write-ticks"] == 1  # qemu-ga reads it as a 32-bit %u
    assert stats["sda"]["stats"]["discard-ticks"] == 15 and "flush-ios" not in stats["sda"]["stats"]
    assert stats["loop0"]["stats"]["flush-ios"] == 16 and stats["loop0"]["stats"]["flush-ticks"] == 17
    assert stats["loop1"]["stats"] == {}


class Ticks(Platform):
    def clock_ticks(self):
        return 100


def test_cpustats_in_milliseconds(tmp_path):
    make_tree(tmp_path, {"/proc/stat": (
        "cpu  100 0 50 1000 3 0 1 0 0 0\n"
        "cpu0 10 1 5 100 3 2 1 7 4 2\n"
        "cpu1 20 0 6 200 1 0 9\n"
        "cpu2 30 0 7 300\n"
        "intr 12345 0 0\n"
        "cpu3 1 2\n"
        "cpu4 1 1 1 1\n")})
    stats = call(Ticks(root=str(tmp_path)), "guest-get-cpustats")["return"]
    assert stats == [
        {"type": "linux", "cpu": 0, "user": 100, "nice": 10, "system": 50, "idle": 1000,
         "iowait": 30, "irq": 20, "softirq": 10, "steal": 70, "guest": 40, "guestnice": 20},
        {"type": "linux", "cpu": 1, "user": 200, "nice": 0, "system": 60, "idle": 2000,
         "iowait": 10, "irq": 0, "softirq": 90},
        {"type": "linux", "cpu": 2, "user": 300, "nice": 0, "system": 70, "idle": 3000},
    ]  # cpu3 has too few fields: qemu-ga stops reading there


def test_missing_proc_files_are_errors(tmp_path):
    platform = Ticks(root=str(tmp_path))
    assert call(platform, "guest-get-diskstats")["error"]["desc"] == \
        'open("/proc/diskstats"): No such file or directory'
    assert call(platform, "guest-get-cpustats")["error"]["desc"] == \
        'open("/proc/stat"): No such file or directory'


# -- network ------------------------------------------------------------------------


class FakeNet(Platform):
    """getifaddrs and SIOCGIFHWADDR answers of a small guest."""

    MACS = {"lo": bytes(6), "eth0": bytes.fromhex("5254001234ab"),
            "eth0:1": bytes.fromhex("5254001234ab")}

    def getifaddrs(self):
        v4 = lambda text: socket.inet_pton(socket.AF_INET, text)  # noqa: E731
        v6 = lambda text: socket.inet_pton(socket.AF_INET6, text)  # noqa: E731
        return [IfAddr("lo", socket.AF_PACKET, None, None),
                IfAddr("eth0", socket.AF_PACKET, None, None),
                IfAddr("wg0", socket.AF_PACKET, None, None),
                IfAddr("lo", socket.AF_INET, v4("127.0.0.1"), v4("255.0.0.0")),
                IfAddr("eth0", socket.AF_INET, v4("10.0.0.5"), v4("255.255.254.0")),
                IfAddr("eth0:1", socket.AF_INET, v4("10.9.0.1"), v4("255.255.0.0")),
                IfAddr("wg0", socket.AF_INET, v4("10.200.0.1"), None),
                IfAddr("eth0", socket.AF_INET6, v6("fe80::5054:ff:fe12:34ab"),
                       v6("ffff:ffff:ffff:ffff::"))]

    def hardware_address(self, name):
        if name not in self.MACS:
            raise OSError(99, "Cannot assign requested address")  # EADDRNOTAVAIL
        return self.MACS[name]


def test_network_interfaces(tmp_path):
    make_tree(tmp_path, {"/proc/net/dev": (
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo:  100  2 0 0 0 0 0 0  100  2 0 0 0 0 0 0\n"
        "  eth0: 5000 40 1 2 0 0 0 3 6000 50 4 5 0 0 0 0\n")})
    interfaces = call(FakeNet(root=str(tmp_path)), "guest-network-get-interfaces")["return"]
    stats = lambda *v: dict(zip(("rx-bytes", "rx-packets", "rx-errs", "rx-dropped",  # noqa: E731
                                 "tx-bytes", "tx-packets", "tx-errs", "tx-dropped"), v))
    assert interfaces == [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
         "statistics": stats(100, 2, 0, 0, 100, 2, 0, 0)},
        {"name": "eth0", "hardware-address": "52:54:00:12:34:ab",
         "ip-addresses": [
             {"ip-address": "10.0.0.5", "ip-address-type": "ipv4", "prefix": 23},
             {"ip-address": "fe80::5054:ff:fe12:34ab", "ip-address-type": "ipv6", "prefix": 64}],
         "statistics": stats(5000, 40, 1, 2, 6000, 50, 4, 5)},
        {"name": "wg0",  # no MAC to report; no netmask: prefix 0; not in /proc/net/dev
         "ip-addresses": [{"ip-address": "10.200.0.1", "ip-address-type": "ipv4", "prefix": 0}]},
        {"name": "eth0:1", "hardware-address": "52:54:00:12:34:ab",
         "ip-addresses": [{"ip-address": "10.9.0.1", "ip-address-type": "ipv4", "prefix": 16}]},
    ]


# -- os-release ---------------------------------------------------------------------


QEMU_UNIT_TEST_OS_RELEASE = (
    'ID=qemu-ga-test\nNAME=QEMU-GA\nPRETTY_NAME="QEMU Guest Agent test"\n'
    'VERSION="Test 1"\nVERSION_ID=1\n'
    'VARIANT="Unit test \\"\\\'\\$\\`\\\\ and \\\\\\\\ etc."\nVARIANT_ID=unit-test\n')


def osinfo(tmp_path, content: bytes | str, **env) -> dict:
    release = tmp_path / "os-release"
    release.write_bytes(content if isinstance(content, bytes) else content.encode())
    platform = Platform(env={"QGA_OS_RELEASE": str(release), **env})
    info = call(platform, "guest-get-osinfo")["return"]
    return {k: v for k, v in info.items() if not k.startswith(("kernel-", "machine"))}


def test_os_release_as_qemus_unit_test(tmp_path):
    assert osinfo(tmp_path, QEMU_UNIT_TEST_OS_RELEASE) == {
        "id": "qemu-ga-test", "name": "QEMU-GA", "pretty-name": "QEMU Guest Agent test",
        "version": "Test 1", "version-id": "1", "variant": "Unit test \"'$`\\ and \\\\ etc.",
        "variant-id": "unit-test"}


@pytest.mark.parametrize("content, expected", [
    ("ID='single quoted value'\nNAME=unquoted value;tail\nPRETTY_NAME=\"dq with ; semicolon\"\n"
     "VERSION=\n", {"id": "'single", "name": "unquoted", "pretty-name": "dq with ; semicolon",
                    "version": ""}),
    ('NAME="no closing quote\n', {"name": "no closing quotee"}),  # qemu-ga's copy quirk
    ("  ID = spaced\n# comment\n\nNAME=x\n[other]\nVERSION=1\n", {"id": "spaced", "name": "x"}),
    ("ID=x\nthis line is no key value pair\n", {}),                   # GLib rejects the file
    (b"ID=caf\xe9\n", {}),                                              # not UTF-8
])
def test_os_release_value_rules(tmp_path, content, expected):
    assert osinfo(tmp_path, content) == expected


def test_os_release_fallback_and_kernel(tmp_path):
    make_tree(tmp_path, {"/usr/lib/os-release": "ID=fallback\n"})
    info = call(Platform(root=str(tmp_path)), "guest-get-osinfo")["return"]
    import os
    uts = os.uname()
    assert info == {"id": "fallback", "kernel-release": uts.release,
                    "kernel-version": uts.version, "machine": uts.machine}


# -- utmp, host name, timezone ---------------------------------------------------------

UTMP_RECORD = struct.Struct("<hxxi32s4s32s256shhiii16s20x")


def utmp(*records) -> bytes:
    return b"".join(UTMP_RECORD.pack(kind, 100, b"pts/0", b"ts/0", user, b"host", 0, 0, 0,
                                     sec, usec, b"") for kind, user, sec, usec in records)


LOGINS = utmp((2, b"reboot", 1, 0), (7, b"alice", 1700000000, 250000),
              (7, b"bob", 1700000100, 500000), (7, b"alice", 1699999999, 750000),
              (8, b"carol", 5, 0), (6, b"LOGIN", 3, 0))


def test_users_from_utmp(tmp_path):
    make_tree(tmp_path, {"/var/run/utmp": LOGINS})
    assert call(Platform(root=str(tmp_path)), "guest-get-users") == {"return": [
        {"user": "alice", "login-time": 1699999999.75},
        {"user": "bob", "login-time": 1700000100.5}]}
    assert call(Platform(root=str(tmp_path / "none")), "guest-get-users") == {"return": []}


def test_host_name_and_timezone():
    class Fixed(Platform):
        def hostname(self):
            return "guest-7"

        def local_timezone(self):
            return "CEST", 7200

    assert call(Fixed(), "guest-get-host-name") == {"return": {"host-name": "guest-7"}}
    assert call(Fixed(), "guest-get-timezone") == {"return": {"zone": "CEST", "offset": 7200}}


# -- against the real qemu-ga ---------------------------------------------------------


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_same_answers_as_qemu_ga_in_namespaces(qemu_ga, tmp_path):
    """Known interfaces (network namespace), logins (/run/utmp), zone and os-release."""
    tree = make_tree(tmp_path / "tree", {"/run/utmp": LOGINS, "/sys/block": None})
    release = tmp_path / "os-release"
    release.write_text(QEMU_UNIT_TEST_OS_RELEASE)
    answers = probe(tree, qemu_ga, tmp_path / "work", "guest-get-users", "guest-get-timezone",
                    "guest-get-osinfo", "guest-network-get-interfaces", net=True,
                    env={"TZ": "Europe/Berlin", "QGA_OS_RELEASE": str(release)})
    assert answers["ours"] == answers["theirs"]
    users, zone, _osinfo, interfaces = (a["return"] for a in answers["ours"])
    assert [u["user"] for u in users] == ["alice", "bob"]
    assert zone["offset"] in (3600, 7200) or not Path("/usr/share/zoneinfo/Europe/Berlin").exists()
    names = [i["name"] for i in interfaces]
    assert {"lo", "v0", "v1", "v0:alias", "br0", "tap0", "tun0"} <= set(names)


#: answers that describe this machine and cannot change between two calls
STABLE = ("guest-get-osinfo", "guest-get-host-name", "guest-get-timezone", "guest-get-users",
          "guest-get-vcpus", "guest-get-memory-block-info", "guest-get-memory-blocks",
          "guest-get-disks")
#: answers with counters or usage figures that move: compared by shape and names
MOVING = ("guest-get-fsinfo", "guest-network-get-interfaces", "guest-get-diskstats",
          "guest-get-cpustats")


@pytest.mark.oracle
@pytest.mark.parametrize("name", STABLE + MOVING)
def test_same_answers_as_qemu_ga_on_this_machine(reference_agent, tmp_path, name):
    ours = agent_call(make_ctx(Platform(), tmp_path), name)
    theirs = reference_agent.request(name)
    if name in STABLE:
        assert ours == theirs
        return
    assert shape(ours) == shape(theirs)
    key = {"guest-get-fsinfo": "mountpoint", "guest-get-cpustats": "cpu"}.get(name, "name")
    assert [item[key] for item in ours["return"]] == [item[key] for item in theirs["return"]]


@pytest.mark.oracle
@pytest.mark.parametrize("name, args", [
    ("guest-ssh-get-authorized-keys", {"username": "no-such-user-xyz"}),
    ("guest-ssh-get-authorized-keys", {"username": "root"}),
    ("guest-ssh-add-authorized-keys", {"username": "no-such-user-xyz", "keys": ["# comment"]}),
    ("guest-ssh-add-authorized-keys", {"username": "no-such-user-xyz", "keys": ["a\nb"]}),
    ("guest-ssh-add-authorized-keys", {"username": "no-such-user-xyz", "keys": [""]}),
    ("guest-ssh-remove-authorized-keys", {"username": "no-such-user-xyz", "keys": ["k"]}),
    ("guest-ssh-remove-authorized-keys", {"username": "no-such-user-xyz", "keys": ["#"]}),
])
def test_same_ssh_errors_as_qemu_ga(ssh_reference_agent, tmp_path, name, args):
    assert agent_call(make_ctx(Platform(), tmp_path), name, **args) == \
        ssh_reference_agent.request(name, **args)


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tz", ["Asia/Kolkata", "EST5EDT", ":Europe/Paris", "<+0330>-3:30",
                                "Foo/Bar", ""])
def test_timezone_same_as_qemu_ga(qemu_ga, tmp_path, tz):
    """Zone names, POSIX rules, and a TZ naming nothing (UTC for GLib)."""
    tree = make_tree(tmp_path / "tree", {"/sys/block": None})
    answers = probe(tree, qemu_ga, tmp_path / "work", "guest-get-timezone", env={"TZ": tz})
    assert answers["ours"] == answers["theirs"]
