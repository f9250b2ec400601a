"""Small helpers for host client tests that drive a real QEMU."""

from __future__ import annotations

import os
import subprocess

from hostclient.qmp import Monitor


def hmp_write(mon: Monitor, dev_id: str, pattern: int, offset: int, length: int) -> None:
    out = mon.execute("human-monitor-command", {
        "command-line": f'qemu-io -d {dev_id} "write -P {pattern} {offset} {length}"'})
    assert "error" not in out.lower(), out   # qemu-io prints its own report on QEMU's stdout


def read_at(qemu_img: str, path, offset: int, length: int) -> bytes:
    raw = str(path) + ".read"
    subprocess.run([qemu_img, "convert", "-U", "-O", "raw", str(path), raw], check=True)
    try:
        with open(raw, "rb") as f:
            f.seek(offset)
            return f.read(length)
    finally:
        os.unlink(raw)
