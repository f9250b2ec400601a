"""Issue 6's real proof: `quiesce backup` of a real guest under write load.

The guest runs the agent (the project's qga, and qemu-ga as the reference),
an ext4 data disk on qcow2 and a writer (temporary name, fsync, rename, with
checksums). The backup must pass qemu-img check and e2fsck -fn, every
complete file in it must match its checksum, and the guest must keep running
on its original image with no overlay left.
"""

from __future__ import annotations

import pytest

from e2e_readiness import AGENTS, needs_engine
from e2e_proof import run_proof

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.oracle]


@needs_engine
@pytest.mark.timeout(300)
@pytest.mark.parametrize("agent_name", AGENTS)
def test_backup_of_a_real_guest_under_write_load(agent_name, guest_image, tmp_path,
                                                 qemu_system, qemu_img):
    report = run_proof(tmp_path, agent=agent_name, disk_size="64M", image=guest_image,
                       qemu=qemu_system, qemu_img=qemu_img)
    m = report.manifest
    assert m["status"] == "complete" and m["errors"] == []
    assert m["quiesced"] is True and m["consistency"] == "application"
    assert m["frozen_filesystems"] == 1
    assert 0 < m["freeze_window_ms"] < 5000
    assert report.fs.files_verified >= 5 and report.fs.bad_files == []
    assert report.files_after > report.files_before
    for line in report.checks:
        print(line)
