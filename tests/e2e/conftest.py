"""Fixtures for real-guest tests: the cached kernel/initramfs and data disks.

Everything here skips with a stated reason when the guest cannot be had
(no QEMU, no kernel package, no mkfs.ext4); nothing skips silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guest_build import GuestImage, GuestUnavailable, ensure_guest_image
from guest import make_ext4_qcow2


@pytest.fixture(scope="session")
def guest_image(qemu_system: str) -> GuestImage:
    try:
        return ensure_guest_image()
    except GuestUnavailable as exc:
        pytest.skip(f"test guest unavailable: {exc}")


@pytest.fixture
def ext4_qcow2(tmp_path: Path, qemu_img: str) -> Path:
    """A 64 MiB qcow2 image with an empty ext4 filesystem."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (Debian package e2fsprogs)")
    return make_ext4_qcow2(tmp_path / "data.qcow2", "64M", qemu_img)

