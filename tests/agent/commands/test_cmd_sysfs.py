"""The sysfs commands: guest-get-disks, guest-get-fsinfo, vcpus and memory blocks.

Unit tests run the handlers against the fake guest of ``guest_sysfs()``
(one disk of every controller qemu-ga 7.2 understands). The oracle tests
give the real qemu-ga the very same fake /sys, in a private mount
namespace, and require identical answers.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from agent.platform import Mount, Platform
from qga_helpers import RecordingPlatform, agent_call, guest_sysfs, make_ctx, make_tree, probe


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "guest", guest_sysfs())


@pytest.fixture
def platform(tree):
    return RecordingPlatform(root=str(tree))


def call(platform, name, **args):
    return agent_call(make_ctx(platform), name, **args)


def pci(domain, bus, slot, function):
    return {"domain": domain, "bus": bus, "slot": slot, "function": function}


def address(dev, bus_type, controller, *, bus=0, target=0, unit=0, **extra):
    return {"pci-controller": controller, "bus-type": bus_type, "bus": bus, "target": target,
            "unit": unit, "dev": dev, **extra}


NO_PCI = pci(-1, -1, -1, -1)

EXPECTED_DISKS = {
    "/dev/vda": {"name": "/dev/vda", "partition": False, "dependencies": [],
                 "address": address("/dev/vda", "virtio", pci(0, 0, 2, 0), serial="SER-VDA")},
    "/dev/vda1": {"name": "/dev/vda1", "partition": True, "dependencies": ["/dev/vda"]},
    "/dev/vda2": {"name": "/dev/vda2", "partition": True, "dependencies": ["/dev/vda"]},
    "/dev/vdb": {"name": "/dev/vdb", "partition": False, "dependencies": [],
                 "address": address("/dev/vdb", "virtio", pci(0, 1, 3, 0))},
    "/dev/sda": {"name": "/dev/sda", "partition": False, "dependencies": [],
                 "address": address("/dev/sda", "scsi", pci(0, 0, 3, 0), unit=2,
                                    serial="0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-2")},
    "/dev/sdb": {"name": "/dev/sdb", "partition": False, "dependencies": [],
                 "address": address("/dev/sdb", "sata", pci(0, 0, 31, 2), unit=1)},
    "/dev/sdc": {"name": "/dev/sdc", "partition": False, "dependencies": [],
                 "address": address("/dev/sdc", "ide", pci(0, 0, 1, 1), bus=1, unit=1)},
    "/dev/sdd": {"name": "/dev/sdd", "partition": False, "dependencies": [],
                 "address": address("/dev/sdd", "scsi", pci(0, 0, 5, 0), unit=4)},
    "/dev/sde": {"name": "/dev/sde", "partition": False, "dependencies": [],
                 "address": address("/dev/sde", "unknown", NO_PCI)},
    "/dev/nvme0n1": {"name": "/dev/nvme0n1", "partition": False, "dependencies": [],
                     "address": address("/dev/nvme0n1", "nvme", pci(0, 0, 4, 0))},
    "/dev/nvme0n1p1": {"name": "/dev/nvme0n1p1", "partition": True,
                       "dependencies": ["/dev/nvme0n1"]},
    "/dev/vdc": {"name": "/dev/vdc", "partition": False, "dependencies": [],
                 "address": address("/dev/vdc", "virtio", NO_PCI, **{"ccw-address": {
                     "cssid": 0, "ssid": 0, "subchno": 2, "devno": 4}})},
    "/dev/dm-0": {"name": "/dev/dm-0", "partition": False, "alias": "vg-root",
                  "dependencies": ["/dev/vda2"]},
    "/dev/dm-1": {"name": "/dev/dm-1", "partition": False, "dependencies": ["/dev/dm-0"]},
    "/dev/loop1": {"name": "/dev/loop1", "partition": False},
}


def test_disks_of_every_controller(platform):
    disks = call(platform, "guest-get-disks")["return"]
    assert {d["name"]: d for d in disks} == EXPECTED_DISKS
    assert len(disks) == len(EXPECTED_DISKS)  # zero-sized loop0/sr0 and README left out
    # qemu-ga prepends: each disk's partitions come right before it
    names = [d["name"] for d in disks]
    at = names.index("/dev/vda")
    assert sorted(names[at - 2:at]) == ["/dev/vda1", "/dev/vda2"]


def test_nvme_smart_log_is_decoded(tree):
    log = bytearray(512)
    log[0], log[3], log[4], log[5] = 1, 100, 10, 3
    struct.pack_into("<H", log, 1, 310)
    struct.pack_into("<QQ", log, 32, 123456, 1)       # data units read
    struct.pack_into("<QQ", log, 176, 7, 0)           # error log entries

    class WithNvme(Platform):
        def nvme_smart_log(self, devnode):
            return bytes(log) if devnode == "/dev/nvme0n1" else None

    disks = call(WithNvme(root=str(tree)), "guest-get-disks")["return"]
    smart = next(d for d in disks if d["name"] == "/dev/nvme0n1")["smart"]
    assert smart["type"] == "nvme"
    assert (smart["critical-warning"], smart["temperature"], smart["available-spare"],
            smart["available-spare-threshold"], smart["percentage-used"]) == (1, 310, 100, 10, 3)
    assert (smart["data-units-read-lo"], smart["data-units-read-hi"]) == (123456, 1)
    assert smart["number-of-error-log-entries-lo"] == 7
    assert len(smart) == 1 + 5 + 20


def test_fsinfo_follows_device_mapper_down_to_the_disk(tree):
    make_tree(tree, {"/proc/self/mountinfo": (
        "21 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n"
        "22 21 254:1 / /boot rw,relatime shared:2 - ext4 /dev/vda1 rw\n"
        "23 21 0:21 / /proc rw - proc proc rw\n"
        "24 21 8:0 / /data\\040disk rw - xfs /dev/sda rw\n"
        "25 21 254:1 /sub /srv/bind rw - ext4 /dev/vda1 rw\n"
        "26 21 9:9 / /gone rw - ext4 /dev/md9 rw\n"),
        "/boot": None, "/srv/bind": None, "/data disk": None, "/gone": None})

    class Sized(Platform):
        def statvfs(self, path):
            if path == "/gone":
                raise FileNotFoundError(2, "gone")
            return os.statvfs_result((4096, 1024, 100, 40, 30, 0, 0, 0, 0, 255, 0))

    fsinfo = call(Sized(root=str(tree)), "guest-get-fsinfo")["return"]
    usage = {"used-bytes": 60 * 1024, "total-bytes": 90 * 1024}
    vda1 = address("/dev/vda1", "virtio", pci(0, 0, 2, 0))
    assert fsinfo == [  # reverse mount order; the bind mount counted twice, as 7.2 does
        {"name": "9:9", "mountpoint": "/gone", "type": "ext4", "disk": []},
        {"name": "vda1", "mountpoint": "/srv/bind", "type": "ext4", "disk": [vda1], **usage},
        {"name": "sda", "mountpoint": "/data disk", "type": "xfs", "disk": [
            address("/dev/sda", "scsi", pci(0, 0, 3, 0), unit=2,
                    serial="0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-2")], **usage},
        {"name": "vda1", "mountpoint": "/boot", "type": "ext4", "disk": [vda1], **usage},
        {"name": "dm-0", "mountpoint": "/", "type": "ext4", "disk": [
            address("/dev/vda2", "virtio", pci(0, 0, 2, 0), serial="SER-VDA")], **usage},
    ]


def test_mount_list_rules(tree):
    make_tree(tree, {"/proc/self/mountinfo": (
        "30 1 0:45 / /mnt/btrfs rw - btrfs /dev/vdz rw\n"
        "31 1 0:46 / /mnt/nfs rw - nfs4 server:/export rw\n"
        "32 1 254:0 / /mnt/odd\\134name rw - ext4 /dev/vda rw\n"
        "garbage line\n")})

    class BtrfsOnVdz(Platform):
        def stat(self, path):
            if path == "/dev/vdz":
                return _blockdev(os.makedev(254, 48))
            return super().stat(path)

    assert BtrfsOnVdz(root=str(tree)).mount_list() == [
        Mount("/mnt/btrfs", "btrfs", 254, 48), Mount("/mnt/odd\\name", "ext4", 254, 0)]


def _blockdev(rdev):
    class St:
        st_mode = 0o060600
        st_rdev = rdev
    return St()


def test_vcpus(platform):
    vcpus = call(platform, "guest-get-vcpus")["return"]
    assert sorted(vcpus, key=lambda v: v["logical-id"]) == [
        {"logical-id": 0, "online": True, "can-offline": False},
        {"logical-id": 1, "online": True, "can-offline": True},
        {"logical-id": 2, "online": False, "can-offline": True}]


def test_set_vcpus_writes_only_changes(platform):
    vcpus = [{"logical-id": 2, "online": True}, {"logical-id": 1, "online": True},
             {"logical-id": 0, "online": True}]
    assert call(platform, "guest-set-vcpus", vcpus=vcpus) == {"return": 3}
    assert platform.calls == [("write_file", "/sys/devices/system/cpu/cpu2//online", b"1")]


def test_set_vcpus_error_only_when_nothing_was_done(platform):
    assert call(platform, "guest-set-vcpus", vcpus=[{"logical-id": 0, "online": False}]) == \
        {"error": {"class": "GenericError", "desc": "logical processor #0 can't be offlined"}}
    assert call(platform, "guest-set-vcpus", vcpus=[
        {"logical-id": 1, "online": False}, {"logical-id": 9, "online": True},
        {"logical-id": 2, "online": True}]) == {"return": 1}
    assert call(platform, "guest-set-vcpus", vcpus=[{"logical-id": 9, "online": True}]) == \
        {"error": {"class": "GenericError",
                   "desc": 'open("/sys/devices/system/cpu/cpu9/"): No such file or directory'}}
    assert call(platform, "guest-set-vcpus", vcpus=[]) == {"return": 0}


def test_memory_blocks(platform):
    blocks = call(platform, "guest-get-memory-blocks")["return"]
    assert sorted(blocks, key=lambda b: b["phys-index"]) == [
        {"phys-index": 0, "online": True, "can-offline": False},
        {"phys-index": 1, "online": True, "can-offline": True},
        {"phys-index": 32, "online": False, "can-offline": True},
        {"phys-index": 33, "online": True, "can-offline": False}]
    assert call(platform, "guest-get-memory-block-info") == {"return": {"size": 134217728}}


def test_set_memory_blocks_answers_per_block(platform):
    result = call(platform, "guest-set-memory-blocks", **{"mem-blks": [
        {"phys-index": 32, "online": True}, {"phys-index": 0, "online": True},
        {"phys-index": 99, "online": False}]})
    assert result == {"return": [
        {"phys-index": 32, "response": "success"},
        {"phys-index": 0, "response": "success"},
        {"phys-index": 99, "response": "not-found", "error-code": 2}]}
    assert platform.calls == [("write_file", "/sys/devices/system/memory/memory32/state",
                               b"online")]


def test_no_memory_hotplug(tmp_path):
    bare = RecordingPlatform(root=str(make_tree(tmp_path, {"/sys/devices/system": None})))
    assert call(bare, "guest-get-memory-blocks") == {"return": []}
    assert call(bare, "guest-set-memory-blocks", **{"mem-blks": [
        {"phys-index": 1, "online": True}]}) == {"return": [
            {"phys-index": 1, "response": "operation-not-supported", "error-code": 2}]}
    assert call(bare, "guest-get-memory-block-info")["error"]["desc"] == \
        'open("/sys/devices/system/memory/"): No such file or directory'
    make_tree(tmp_path, {"/sys/devices/system/memory/block_size_bytes": "8000000\n"})
    assert call(bare, "guest-get-memory-blocks")["error"]["desc"] == \
        "guest reported zero memory blocks!"


# -- the real qemu-ga on the same fake /sys -----------------------------------------


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_same_answers_as_qemu_ga_on_the_same_sysfs(tree, qemu_ga, tmp_path):
    commands = ["guest-get-disks", "guest-get-vcpus", "guest-get-memory-blocks",
                "guest-get-memory-block-info"]
    answers = probe(tree, qemu_ga, tmp_path / "work", *commands)
    assert answers["ours"] == answers["theirs"]
    assert {d["name"]: d for d in answers["ours"][0]["return"]} == EXPECTED_DISKS


@pytest.mark.root
@pytest.mark.oracle
@pytest.mark.timeout(90)
def test_fsinfo_same_as_qemu_ga_with_loop_and_bind_mounts(tree, qemu_ga, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is needed for a loop-mounted filesystem")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    (tmp_path / "src").mkdir()
    answers = probe(tree, qemu_ga, tmp_path / "work",
                    "--loop", f"{image}=/sys/devices/virtual/block/dm-1",
                    "--bind", f"{tmp_path / 'src'}={tmp_path / 'bound'}", "guest-get-fsinfo")
    def steady(answer):
        # the machine's own filesystems fill up while other tests run: their
        # usage figures are compared by presence, the loop filesystem's exactly
        return [{key: (True if key.endswith("-bytes") and not fs["mountpoint"].endswith(
                    "loop-mnt") else value) for key, value in fs.items()}
                for fs in answer[0]["return"]]

    assert steady(answers["ours"]) == steady(answers["theirs"])
    loop = [fs for fs in answers["ours"][0]["return"] if fs["mountpoint"].endswith("loop-mnt")]
    assert loop and loop[0]["name"] == "dm-1" and loop[0]["disk"][0]["dev"] == "/dev/vda2"
